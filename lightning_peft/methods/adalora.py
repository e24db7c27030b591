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
        layers: ``(name, layer)`` of every SVD adapter, in a fixed order (the same on every rank); layers already
            pruned to rank 0 are left out (they hold no triplet to score).
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
        layers = [(name, layer) for name, layer in layers if layer.r > 0]  # a layer pruned to rank 0 has no triplet
        if not layers:
            raise ValueError("AdaLoRA needs at least one SVD adapter layer with rank > 0")
        config.check_total_step(total_step)
        self.config = config
        self.total_step = int(total_step)
        self.names = [name for name, _ in layers]
        self.layers = [layer for _, layer in layers]
        self.init_ranks = [layer.r for layer in self.layers]
        self.init_bgt = sum(self.init_ranks)
        self.target_bgt = config.target_r * len(self.layers)
        # Layers whose A and B have the same shapes form a group, processed as one batch. The EMA buffers are flat
        # and laid out group by group (all A of the group, then all E, then all B), so a group's scores are plain
        # (n, r, in) / (n, r) / (n, out, r) views of the buffer: no per-layer loop and no copies on masking steps.
        groups: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            groups.setdefault((tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)), []).append(i)
        self._groups = list(groups.values())
        self._order = [(i, kind) for g in self._groups for kind in ("lora_A", "lora_E", "lora_B") for i in g]
        params = self._params()
        device = params[0].device
        self._numels = [p.numel() for p in params]
        self._exp_avg_ipt = torch.zeros(sum(self._numels), device=device, dtype=torch.float32)
        self._exp_avg_unc = torch.zeros_like(self._exp_avg_ipt)
        self._score = torch.zeros_like(self._exp_avg_ipt)
        self._buf_p = torch.zeros_like(self._exp_avg_ipt)
        self._buf_g = torch.zeros_like(self._exp_avg_ipt)
        self._param_list = params
        # views into the flat buffers, one per adapter tensor, made once (the layers keep their shapes until shrink)
        self._avg_ipt_views = self._views(self._exp_avg_ipt)
        self._avg_unc_views = self._views(self._exp_avg_unc)
        self._group_scores = []
        offset = 0
        for g in self._groups:
            a, b = self.layers[g[0]].lora_A, self.layers[g[0]].lora_B
            n, r = len(g), a.shape[0]
            size_a, size_b = n * a.numel(), n * b.numel()
            view_a = self._score[offset : offset + size_a].view(n, r, -1)
            view_e = self._score[offset + size_a : offset + size_a + n * r].view(n, r)
            view_b = self._score[offset + size_a + n * r : offset + size_a + n * r + size_b].view(n, b.shape[0], -1)
            self._group_scores.append((view_a, view_e, view_b))
            offset += size_a + n * r + size_b
        self.masks: list[torch.Tensor] = [torch.ones(r, dtype=torch.bool, device=device) for r in self.init_ranks]
        self._kept = self.init_bgt
        self.rank_pattern: list[torch.Tensor] | None = None  # frozen at total_step - tfinal
        self.budget = self.init_bgt
        self.updates = 0
        self.history: list[tuple[int, int]] = []  # (step, budget) at every masking step

    # ----------------------------------------------------------------------------------------- state
    def _params(self) -> list[torch.Tensor]:
        return [getattr(self.layers[i], kind) for i, kind in self._order]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self._numels), self._params(), strict=True)]

    def ema(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``{layer: {"lora_A" | "lora_E" | "lora_B": (EMA of sensitivity, EMA of uncertainty)}}`` as views."""
        out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {name: {} for name in self.names}
        for (i, kind), ipt, unc in zip(self._order, self._avg_ipt_views, self._avg_unc_views, strict=True):
            out[self.names[i]][kind] = (ipt, unc)
        return out

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
        self._kept = int(sum(int(m.sum()) for m in self.masks))
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
        grads = [p.grad for p in self._param_list]
        if any(g is None for g in grads):
            return False
        # Two concatenations into preallocated flat buffers, then a handful of whole-buffer ops: the cost does not
        # grow with the number of adapter tensors (a foreach op over hundreds of small tensors does).
        ipt, g_flat = self._buf_p, self._buf_g
        torch.cat([p.detach().reshape(-1).float() for p in self._param_list], out=ipt)
        torch.cat([g.reshape(-1).float() for g in grads], out=g_flat)  # type: ignore[union-attr]
        ipt.mul_(g_flat).abs_()
        if not bool(torch.isfinite(ipt.sum())):  # inf/nan anywhere (a step the AMP scaler skips): keep the EMAs
            return False
        # b * avg + (1 - b) * x == avg.lerp_(x, 1 - b): one pass instead of two
        self._exp_avg_ipt.lerp_(ipt, 1 - self.config.beta1)
        ipt.sub_(self._exp_avg_ipt).abs_()  # the uncertainty |I - EMA(I)|, in place
        self._exp_avg_unc.lerp_(ipt, 1 - self.config.beta2)
        self.updates += 1
        return True

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """Per layer, the ``r`` scores ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`` with ``s = EMA(I) * EMA(U)``."""
        torch.mul(self._exp_avg_ipt, self._exp_avg_unc, out=self._score)
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.layers)
        for group, (s_a, s_e, s_b) in zip(self._groups, self._group_scores, strict=True):
            triplet = s_e + s_a.mean(dim=2) + s_b.mean(dim=1)
            for i, row in zip(group, triplet.unbind(0), strict=True):
                out[i] = row
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

    @property
    def kept(self) -> int:
        """Number of triplets the current masks keep (computed when the masks change, not on every step)."""
        return self._kept

    @torch.no_grad()
    def _apply(self, masks: list[torch.Tensor]) -> None:
        if masks is not self.masks:
            self._kept = int(torch.stack([m.sum() for m in masks]).sum())
        self.masks = masks
        e: list[torch.Tensor] = [layer.lora_E for layer in self.layers]
        factors: list[torch.Tensor] = [m.view(-1, 1).to(e[0].dtype) for m in masks]
        torch._foreach_mul_(e, factors)

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
    def add_orthogonal_grad(self, weight: float | None = None) -> torch.Tensor:
        """Add the gradient of ``weight * mean_M ||M - I||_F`` over ``M = A Aᵀ`` and ``M = Bᵀ B`` to ``.grad``.

        ``d||A Aᵀ - I||_F / dA = 2 (A Aᵀ - I) A / ||A Aᵀ - I||_F`` and
        ``d||Bᵀ B - I||_F / dB = 2 B (Bᵀ B - I) / ||Bᵀ B - I||_F``.
        Computed on the parameters' values, without autograd or a second backward. Returns the penalty value as a
        0-d tensor (no device synchronisation on the training path).
        """
        w = self.config.orth_reg_weight if weight is None else weight
        n_mats = 2 * sum(1 for layer in self.layers if layer.r > 0)
        if w == 0 or n_mats == 0:
            return torch.zeros((), device=self._exp_avg_ipt.device)
        scale = w / n_mats
        total = torch.zeros((), device=self._exp_avg_ipt.device)
        for group in self._groups:
            if self.layers[group[0]].r == 0:
                continue
            for name in ("lora_A", "lora_B"):
                params = [getattr(self.layers[i], name) for i in group]
                p = torch.stack([q.detach().flatten(1).float() for q in params])  # (n, r, in) or (n, out, r)
                if name == "lora_B":
                    p = p.transpose(1, 2)  # Bᵀ B - I = (Bᵀ)(Bᵀ)ᵀ - I: the same formula on Bᵀ
                m = torch.bmm(p, p.transpose(1, 2))
                m.diagonal(dim1=1, dim2=2).sub_(1.0)
                norms = torch.linalg.matrix_norm(m)  # (n,)
                total += norms.sum()
                g = torch.bmm(m, p).mul_((2.0 * scale / norms.clamp_min(1e-12)).view(-1, 1, 1))
                if name == "lora_B":
                    g = g.transpose(1, 2)
                grads = [x.reshape(q.shape).to(q.dtype) for x, q in zip(g.unbind(0), params, strict=True)]
                missing = [q for q in params if q.grad is None]
                for q in missing:
                    q.grad = torch.zeros_like(q)
                torch._foreach_add_([q.grad for q in params], grads)  # type: ignore[misc]
        return total * (w / n_mats)
