"""AdaLoRA's rank allocator (Zhang et al., ICLR 2023), pure torch.

Each adapted layer holds ``r`` singular triplets ``(A_i, E_i, B_i)``. Every optimizer step the
allocator smooths, for every adapter entry ``p``, the sensitivity ``I = |p * grad|`` with an EMA
(``beta1``) and its uncertainty ``U = |I - EMA(I)|`` with a second EMA (``beta2``); an entry's score
is ``EMA(I) * EMA(U)``. A triplet's score is ``score(E_i) + mean_j score(A_ij) + mean_k score(B_ki)``.
The total budget (number of triplets kept over all layers) is ``init_r x layers`` for the first
``tinit`` steps, decays cubically to ``target_r x layers`` until ``total_step - tfinal``, and the
rank pattern is frozen for the last ``tfinal`` steps. Every ``deltaT`` steps of the decay the
triplets at or below the global ``(init_budget - budget)``-th smallest score get ``E_i = 0``.

The formulas, the schedule and the step convention are peft's ``RankAllocator`` (checked by a test
that feeds both the same parameters and gradients). Deliberate differences:

* **Where the sensitivity is read.** peft's loop calls ``update_and_allocate`` after
  ``optimizer.step()``, so ``|p * grad|`` pairs the *updated* ``p`` with the gradient taken at the
  old one. :meth:`RankAllocator.update_importance` is meant to run before the optimizer step
  (Lightning's ``on_before_optimizer_step``), pairing each gradient with the parameters it was
  computed at: the first-order Taylor estimate the paper defines.
* **Cost.** The EMAs of all adapters live in two flat buffers updated with ``torch._foreach_*``
  (a handful of kernels per step instead of a Python loop over every parameter, and no per-step
  allocation of score tensors); triplet scores are computed only on masking steps.
* **Non-finite gradients** (a step the AMP scaler will skip) leave the EMAs untouched.
* **The regulariser** ``||A Aᵀ - I||_F + ||Bᵀ B - I||_F`` is applied as an analytic gradient added to
  ``.grad`` (:meth:`RankAllocator.add_orthogonal_grad`), so it acts whatever the model returns; peft
  adds it to ``outputs.loss`` only when the model's output has a ``.loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_peft.adapters.svd import AdaLoRAConfig, SVDLoRALayer

__all__ = ["RankAllocator"]


class RankAllocator:
    """Importance EMAs, the cubic budget schedule and the masks of AdaLoRA's singular triplets.

    Args:
        layers: ``(name, layer)`` of every SVD adapter, in a fixed order (the same on every rank).
        config: the AdaLoRA hyper-parameters.
        total_step: optimizer steps of the run (overrides ``config.total_step``).

    Raises:
        ValueError: no layers, or a schedule that does not fit into ``total_step``.

    Example:
        >>> from torch import nn
        >>> from lightning_peft.adapters import inject_adapters, adapter_layers
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> cfg = AdaLoRAConfig(r=4, target_r=2, target_modules=["0", "1"], tinit=2, tfinal=2, total_step=10)
        >>> _ = inject_adapters(net, cfg)
        >>> alloc = RankAllocator(list(adapter_layers(net)), cfg, total_step=10)
        >>> [alloc.budget_schedule(s)[0] for s in (0, 2, 3, 5, 7, 9)]
        [8, 8, 6, 4, 4, 4]
    """

    def __init__(self, layers: Sequence[tuple[str, SVDLoRALayer]], config: AdaLoRAConfig, total_step: int) -> None:
        if not layers:
            raise ValueError("AdaLoRA needs at least one SVD adapter layer")
        config.check_total_step(total_step)
        self.config = config
        self.total_step = int(total_step)
        self.names = [name for name, _ in layers]
        self.layers = [layer for _, layer in layers]
        self.init_ranks = [layer.r for layer in self.layers]
        self.init_bgt = sum(self.init_ranks)
        self.target_bgt = config.target_r * len(self.layers)
        params = self._params()
        device = params[0].device
        self._numels = [p.numel() for p in params]
        self._exp_avg_ipt = torch.zeros(sum(self._numels), device=device, dtype=torch.float32)
        self._exp_avg_unc = torch.zeros_like(self._exp_avg_ipt)
        # views into the flat buffers, one per adapter tensor, made once (the layers keep their shapes until shrink)
        self._avg_ipt_views = self._views(self._exp_avg_ipt)
        self._avg_unc_views = self._views(self._exp_avg_unc)
        self.masks: list[torch.Tensor] = [torch.ones(r, dtype=torch.bool, device=device) for r in self.init_ranks]
        self.rank_pattern: list[torch.Tensor] | None = None  # frozen at total_step - tfinal
        self.budget = self.init_bgt
        self.updates = 0
        self.history: list[tuple[int, int]] = []  # (step, budget) at every masking step

    # ----------------------------------------------------------------------------------------- state
    def _params(self) -> list[torch.Tensor]:
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_E, layer.lora_B)]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self._numels), self._params(), strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly (tensors and primitives only)."""
        return {
            "names": list(self.names),
            "init_ranks": list(self.init_ranks),
            "total_step": self.total_step,
            "exp_avg_ipt": self._exp_avg_ipt.detach().cpu().clone(),
            "exp_avg_unc": self._exp_avg_unc.detach().cpu().clone(),
            "masks": [m.cpu().clone() for m in self.masks],
            "rank_pattern": None if self.rank_pattern is None else [m.cpu().clone() for m in self.rank_pattern],
            "budget": self.budget,
            "updates": self.updates,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses state that belongs to other adapters.

        Raises:
            ValueError: the layer names or initial ranks differ from this model's adapters.
        """
        if list(state["names"]) != self.names or list(state["init_ranks"]) != self.init_ranks:
            missing = sorted(set(state["names"]) ^ set(self.names))[:3]
            raise ValueError(
                "the checkpoint's AdaLoRA state does not match the model's adapters "
                f"({len(state['names'])} layers with ranks {sorted(set(state['init_ranks']))} in the checkpoint, "
                f"{len(self.names)} layers with ranks {sorted(set(self.init_ranks))} here"
                + (f"; first differing layers: {missing}" if missing else "")
                + "): resume with the same targets and r"
            )
        device = self._exp_avg_ipt.device
        self._exp_avg_ipt.copy_(state["exp_avg_ipt"].to(device))
        self._exp_avg_unc.copy_(state["exp_avg_unc"].to(device))
        self.masks = [m.to(device) for m in state["masks"]]
        self.rank_pattern = None if state["rank_pattern"] is None else [m.to(device) for m in state["rank_pattern"]]
        self.budget = int(state["budget"])
        self.updates = int(state["updates"])
        self.history = [(int(s), int(b)) for s, b in state["history"]]
        self.total_step = int(state.get("total_step", self.total_step))

    # -------------------------------------------------------------------------------------- schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to mask at this step)`` for the 0-based optimizer step index ``step``."""
        cfg, total = self.config, self.total_step
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > total - cfg.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    def wants_importance(self, step: int) -> bool:
        """Whether the EMAs are still updated at optimizer step ``step`` (they stop when the pattern freezes)."""
        return step < self.total_step - self.config.tfinal

    # ------------------------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_importance(self) -> bool:
        """Fold the current gradients into the sensitivity and uncertainty EMAs.

        Call when gradients are complete (after accumulation and the DDP all-reduce) and before the
        optimizer step. Returns False, changing nothing, if any gradient is missing or non-finite.
        """
        params = self._params()
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return False
        ipt = torch._foreach_mul([p.detach().float() for p in params], [g.float() for g in grads])  # type: ignore[union-attr]
        torch._foreach_abs_(ipt)
        if not bool(torch.stack(torch._foreach_norm(ipt)).isfinite().all()):  # inf/nan anywhere: skip
            return False
        b1, b2 = self.config.beta1, self.config.beta2
        avg_ipt, avg_unc = self._avg_ipt_views, self._avg_unc_views
        torch._foreach_mul_(avg_ipt, b1)
        torch._foreach_add_(avg_ipt, ipt, alpha=1 - b1)
        diff = torch._foreach_sub(ipt, avg_ipt)
        torch._foreach_abs_(diff)
        torch._foreach_mul_(avg_unc, b2)
        torch._foreach_add_(avg_unc, diff, alpha=1 - b2)
        self.updates += 1
        return True

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """Per layer, the ``r`` scores ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`` with ``s = EMA(I) * EMA(U)``."""
        score = self._views(self._exp_avg_ipt * self._exp_avg_unc)
        out = []
        for i in range(len(self.layers)):
            s_a, s_e, s_b = score[3 * i], score[3 * i + 1], score[3 * i + 2]
            out.append(s_e.view(-1) + s_a.flatten(1).mean(dim=1) + s_b.flatten(1).mean(dim=0))
        return out

    # --------------------------------------------------------------------------------------- masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> list[torch.Tensor]:
        """Keep the ``budget`` best triplets over all layers (ties at the threshold are dropped, as in peft)."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:
            masks = [torch.ones_like(s, dtype=torch.bool) for s in scores]
        else:
            threshold = torch.kthvalue(torch.cat(scores), k=k).values
            masks = [s > threshold for s in scores]
        self._apply(masks)
        return masks

    @torch.no_grad()
    def _apply(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks
        for layer, mask in zip(self.layers, masks, strict=True):
            layer.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)

    def allocate(self, step: int) -> int | None:
        """Apply the schedule after optimizer step ``step`` (0-based): mask when due. Returns the budget when it masked.

        Mirrors peft's ``update_and_allocate`` minus the importance update (see :meth:`update_importance`):
        during the decay it masks every ``deltaT`` steps; at ``total_step - tfinal`` it masks to the final
        budget and freezes that rank pattern; afterwards it re-applies the frozen pattern every step.
        """
        final = self.total_step - self.config.tfinal
        if step < final:
            budget, due = self.budget_schedule(step)
            if not due:
                return None
            self.mask_to_budget(budget)
        elif step == final or self.rank_pattern is None:
            budget = self.budget_schedule(step)[0]
            self.rank_pattern = self.mask_to_budget(budget)
        else:
            self._apply(self.rank_pattern)
            return None
        self.budget = budget
        self.history.append((step, budget))
        return budget

    def ranks(self) -> dict[str, int]:
        """Current number of kept triplets per layer."""
        return {name: int(m.sum()) for name, m in zip(self.names, self.masks, strict=True)}

    # ---------------------------------------------------------------------------------- regulariser
    @torch.no_grad()
    def add_orthogonal_grad(self, weight: float | None = None) -> float:
        """Add the gradient of ``weight * mean_M ||M - I||_F`` over ``M = A Aᵀ`` and ``M = Bᵀ B`` to ``.grad``.

        ``d||A Aᵀ - I||_F / dA = 2 (A Aᵀ - I) A / ||A Aᵀ - I||_F`` and ``d||Bᵀ B - I||_F / dB = 2 B (Bᵀ B - I) / ||.||_F``.
        Computed on the parameters' values, without autograd or a second backward. Returns the penalty value.
        """
        w = self.config.orth_reg_weight if weight is None else weight
        if w == 0:
            return 0.0
        mats = []
        for layer in self.layers:
            if layer.r == 0:
                continue
            mats.append((layer.lora_A, True))
            mats.append((layer.lora_B, False))
        total = 0.0
        scale = w / max(len(mats), 1)
        for param, is_a in mats:
            p = param.detach().flatten(1).float()
            if not is_a:
                p = p.T  # Bᵀ B - I = (Bᵀ)(Bᵀ)ᵀ - I: the same formula on Bᵀ
            m = p @ p.T
            m.diagonal().sub_(1.0)
            norm = torch.linalg.matrix_norm(m)
            total += float(norm)
            if norm > 0:
                g = (m @ p).mul_(2.0 * scale / norm)
                g = g if is_a else g.T
                g = g.reshape(param.shape).to(param.dtype)
                if param.grad is None:
                    param.grad = g
                else:
                    param.grad.add_(g)
        return w * total / max(len(mats), 1)
