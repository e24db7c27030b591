"""SVD-form low-rank adapters for AdaLoRA: ``W + B · diag(E) · A · scaling``.

``A`` (``r x in``) and ``B`` (``out x r``) play the right and left singular vectors and ``E``
(``r x 1``) the singular values, so a rank is switched off by zeroing one entry of ``E`` and the
rank budget can be re-allocated between layers during training without changing any shape. At the
end of training :meth:`SVDLoRALayer.shrink` physically drops the switched-off triplets, so the
saved adapter and the inference cost hold only the kept ranks.

Initialisation follows peft (``E = 0``, ``A, B ~ N(0, 0.02)``), and so does the scale:
``scaling = alpha / init_r``, kept when the layer shrinks (a pruned layer's surviving triplets
keep contributing exactly what they did). peft divides by ``init_r + 1e-5``; we divide by
``init_r`` (a relative difference of ~1e-6 in the adapter's contribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.lora import InitKind, LoRAConfig, LoRALayer

__all__ = ["AdaLoRAConfig", "SVDLoRALayer"]


@dataclass
class AdaLoRAConfig(LoRAConfig):
    """Hyper-parameters of AdaLoRA (``r`` is the initial rank of every adapted layer).

    Args:
        target_r: average rank per layer at the end (the final budget is ``target_r x layers``).
        tinit: optimizer steps of warm-up before any pruning.
        tfinal: optimizer steps at the end during which the rank pattern is frozen.
        deltaT: prune every ``deltaT`` optimizer steps during the cubic decay.
        beta1: EMA factor of the sensitivity ``|p * grad|``, in (0, 1).
        beta2: EMA factor of the uncertainty ``|sensitivity - its EMA|``, in (0, 1).
        orth_reg_weight: weight of ``||A Aᵀ - I||_F + ||Bᵀ B - I||_F`` (averaged over matrices), >= 0.
        total_step: optimizer steps of the whole run; None to take it from the trainer.

    Raises:
        ValueError: a value out of range (also ``target_r > r`` and a schedule longer than ``total_step``).
    """

    target_r: int = 4
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - the paper's and peft's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "kaiming":  # AdaLoRA's own init: E = 0 makes the layer start as the identity
            self.init = "gaussian"
        if isinstance(self.target_r, bool) or not isinstance(self.target_r, int) or self.target_r < 0:
            raise ValueError(f"AdaLoRA target_r must be an integer >= 0, got {self.target_r!r}")
        if self.target_r > self.r:
            raise ValueError(
                f"AdaLoRA target_r={self.target_r} is larger than the initial rank r={self.r}; "
                "the budget only shrinks, so pass target_r <= r"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {value!r}")
        if self.deltaT < 1:
            raise ValueError(f"AdaLoRA deltaT must be >= 1 optimizer step, got {self.deltaT!r}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"AdaLoRA tinit and tfinal must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            self.check_total_step(self.total_step)

    def check_total_step(self, total_step: int) -> None:
        """Raise unless the schedule (warm-up, decay, final phase) fits into ``total_step`` optimizer steps."""
        if self.tinit + self.tfinal >= total_step:
            raise ValueError(
                f"AdaLoRA tinit ({self.tinit}) + tfinal ({self.tfinal}) must be smaller than total_step "
                f"({total_step}): "
                "there would be no step left for the budget to decrease; lower tinit/tfinal or train longer"
            )

    @property
    def scaling(self) -> float:
        """``alpha / r`` with the *initial* rank, kept when a layer is pruned or shrunk."""
        return self.alpha / self.r

    def _layer_type(self) -> type[LoRALayer]:
        return SVDLoRALayer


class SVDLoRALayer(LoRALayer):
    """``base(x) + B(diag(E) A(dropout(x))) * scaling`` around a frozen Linear, Conv2d, Conv1D or bitsandbytes Linear.

    ``lora_A``/``lora_B`` have :class:`LoRALayer`'s shapes; ``lora_E`` is ``(r, 1)``.

    Example:
        >>> layer = SVDLoRALayer(nn.Linear(6, 5), r=3, scaling=1.0)
        >>> tuple(layer.lora_E.shape), float(layer.lora_E.detach().abs().sum())
        ((3, 1), 0.0)
    """

    def _make_parameters(
        self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> None:
        super()._make_parameters(a_shape, b_shape, device, dtype)
        self.lora_E = nn.Parameter(torch.empty(a_shape[0], 1, device=device, dtype=dtype))
        self.init_r = a_shape[0]
        self.kept: list[bool] | None = None  # after shrink: which of the init_r triplets survive (peft's rank_pattern)

    @torch.no_grad()
    def reset_parameters(self, init: InitKind = "gaussian") -> None:
        """peft's init: ``E = 0``, ``A, B ~ N(0, 0.02)``; ``"nonzero"`` also draws ``E`` (for tests)."""
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        if init == "nonzero":
            nn.init.normal_(self.lora_E, std=1.0)
        else:
            nn.init.zeros_(self.lora_E)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled or self.r == 0:  # r == 0: every triplet was pruned
            return out
        a = self.lora_A
        if x.dtype is not a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)  # as in LoRALayer.forward
        x = self.lora_dropout(x)
        e = self.lora_E.view(-1) * self.scaling
        if self._conv is not None:
            delta = F.conv2d(F.conv2d(x, a, None, *self._conv) * e.view(1, -1, 1, 1), self.lora_B)
        else:
            delta = F.linear(F.linear(x, a) * e, self.lora_B)
        return out + (delta if delta.dtype is out.dtype else delta.to(out.dtype))

    def delta_weight(self) -> torch.Tensor:
        """``B @ diag(E) @ A * scaling`` shaped like the base weight (float32 maths, the weight's dtype)."""
        a = self.lora_A.float().flatten(1) * self.lora_E.float()
        delta = (self.lora_B.float().flatten(1) @ a) * self.scaling
        if self.kind == "conv1d":
            delta = delta.T
        return delta.reshape(self.weight_shape).to(self._delta_dtype())

    @torch.no_grad()
    def shrink(self, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` (bool, ``r``) is True, as new, smaller parameters.

        The scale stays ``alpha / init_r``, so the layer's output does not change for the kept triplets.
        """
        if self.merged:
            raise RuntimeError("unmerge before shrinking an adapter")
        keep = keep.view(-1).bool()
        if keep.numel() != self.r:
            raise ValueError(f"keep has {keep.numel()} entries but the layer has rank {self.r}")
        survivors = [i for i, k in enumerate(self.kept) if k] if self.kept is not None else list(range(self.r))
        kept = [False] * self.init_r
        for position, original in enumerate(survivors):
            kept[original] = bool(keep[position])
        self.kept = kept
        idx = torch.nonzero(keep.to(self.lora_E.device)).view(-1)
        self.lora_A = nn.Parameter(self.lora_A[idx].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_E = nn.Parameter(self.lora_E[idx].clone(), requires_grad=self.lora_E.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[:, idx].clone(), requires_grad=self.lora_B.requires_grad)
        self.r = int(idx.numel())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", svd=True"
