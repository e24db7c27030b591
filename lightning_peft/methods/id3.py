"""ID³'s unmasker (Agarwal et al., TACL 2025, "Step-by-Step Unmasking for Parameter-Efficient Fine-tuning of LLMs").

ID³ trains a budget ``B`` of scalar parameters chosen step by step. At optimizer step ``t < T`` it
unmasks ``n_t`` more entries: those not chosen yet with the largest score

    ``D3 = |g| / (eps + |theta|) ** exp``

over all targeted tensors (a global top-``n_t``, not per tensor). ``exp`` trades exploitation (large
gradients) against exploration (small weights, which a small step changes relatively much); ``exp=0``
ranks by ``|g|`` alone. The schedule is ``n_t = B // T``, plus one for the first ``B % T`` steps, and
nothing after ``T``: after ``T`` steps exactly ``B`` entries are chosen, and never more.

**Memory.** No model-sized tensor is ever built. The scorer is fed one tensor at a time
(:meth:`Unmasker.observe`, e.g. from :attr:`lightning_peft.adapters.sparse.SparseDeltaLayer.grad_hook`
while the dense gradient of that tensor exists anyway), keeps that tensor's own top-``n_t`` candidates
and drops the rest. :meth:`Unmasker.select` merges the candidates: the global top-``n_t`` is always a
subset of the union of the per-tensor top-``n_t``, so the result is exact. It also keeps the gradient
values at the chosen entries (:attr:`Unmasker.selected_grads`) so a caller can give the new entries
their gradient in the same optimizer step, as the reference does.

**Ties** are broken deterministically: higher score first, then the tensor key in sorted order, then
the lower flat index; within a tensor the same rule picks the candidates. Non-finite scores (a step
whose gradients overflowed) rank below every finite score, so they are chosen only when nothing else
is left.

**Repeated observation.** A gradient cannot be summed without storing it, so when :meth:`observe` is
called more than once for a key before :meth:`select` (gradient accumulation), the last call replaces
the earlier candidates of that key: the choice is made from the last micro-batch's gradient. Under
DDP each rank sees its own gradient; make the choice identical on every rank (for example choose on
rank 0 and broadcast through :mod:`lightning_peft.distributed`).

Differences from the reference (``Aradhye2002/selective-peft-toolkit``,
``selective_optimizers/optimizers/id3.py``), which has the same score and the same ``B // T`` + ``B % T``
schedule:

* it keeps unmasking ``B // T`` entries on every step after ``max_steps`` (``get_num_unmask`` has no
  end), so a run longer than ``T`` steps overshoots the budget; here steps ``>= T`` unmask nothing;
* it turns the global top-``n`` into a threshold and takes every entry ``>=`` it, then trims the excess
  by position in parameter order, so ties can drop higher-scored entries of later tensors; here the
  top-``n`` is exact;
* it asserts ``B // T > 0``; here ``B < T`` is allowed (some steps add nothing);
* it scores dense gradients of the whole model kept in ``.grad`` (dense optimizer state too); here
  nothing model-sized is kept.

Example:
    >>> unmasker = Unmasker(budget=5, total_steps=2, total_params=8, eps=1e-3, exp=0.0)
    >>> [unmasker.schedule(t) for t in range(3)], unmasker.cumulative(1)
    ([3, 2, 0], 5)
    >>> g = torch.tensor([0.1, -0.9, 0.3, 0.0])
    >>> unmasker.observe("a", g, torch.ones(4), torch.tensor([], dtype=torch.long))
    >>> unmasker.observe("b", torch.tensor([0.5, 0.2, -0.4, 0.05]), torch.ones(4), None)
    >>> {k: v.tolist() for k, v in unmasker.select(0).items()}
    {'a': [1], 'b': [0, 2]}
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_peft.methods._config import refuse_changed

__all__ = ["Unmasker"]

_CONFIG = ("budget", "total_steps", "total_params", "eps", "exp")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ID3 {what} must be a positive integer, got {value!r}")
    return value


class Unmasker:
    """The ID³ schedule and the exact global top-``n_t`` over tensors observed one at a time.

    Args:
        budget: number of entries trained in the end, ``1 <= budget <= total_params``.
        total_steps: ``T``, the optimizer steps over which the budget is unmasked (``>= 1``).
        total_params: number of elements of all targeted tensors together (to check the budget fits).
        eps: ``> 0``, keeps the score finite for zero weights.
        exp: ``>= 0``, the exponent on the weight's magnitude; 0 ranks by ``|g|`` only.

    Raises:
        ValueError: a value out of range, with what is allowed.

    Attributes:
        next_step: the step the next :meth:`observe` is for by default (one after the last :meth:`select`).
        unmasked: entries chosen so far.
        selected_grads: after :meth:`select`, ``{key: gradient values at the chosen indices}`` (float32).
    """

    def __init__(self, budget: int, total_steps: int, total_params: int, eps: float = 1e-8, exp: float = 1.0) -> None:
        _positive_int(total_params, "total_params (elements of the targeted tensors)")
        _positive_int(budget, "budget")
        if budget > total_params:
            raise ValueError(
                f"ID3 budget {budget} exceeds the {total_params} elements of the targeted tensors; "
                "lower the budget or target more tensors"
            )
        _positive_int(total_steps, "total_steps (the unmasking steps T)")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"ID3 eps must be a finite number > 0, got {eps!r}")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not (math.isfinite(exp) and exp >= 0):
            raise ValueError(f"ID3 exp must be a finite number >= 0 (0: rank by |gradient| only), got {exp!r}")
        self.budget, self.total_steps, self.total_params = budget, total_steps, total_params
        self.eps, self.exp = float(eps), float(exp)
        self.next_step = 0
        self.unmasked = 0
        self.selected_grads: dict[str, torch.Tensor] = {}
        # key -> (step, scores, flat indices, gradient values) of that tensor's own top candidates
        self._candidates: dict[str, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -------------------------------------------------------------------------------------- schedule
    def schedule(self, step: int) -> int:
        """Entries unmasked at optimizer step ``step`` (0-based): ``B // T``, +1 in the first ``B % T`` steps, 0 from T.

        Raises:
            ValueError: ``step`` is negative.
        """
        if step < 0:
            raise ValueError(f"ID3 steps count from 0, got {step}")
        if step >= self.total_steps:
            return 0
        return self.budget // self.total_steps + (1 if step < self.budget % self.total_steps else 0)

    def cumulative(self, step: int) -> int:
        """Entries unmasked by the end of step ``step`` (steps ``0..step``); ``cumulative(-1) == 0``."""
        done = max(0, min(step + 1, self.total_steps))
        return done * (self.budget // self.total_steps) + min(done, self.budget % self.total_steps)

    def wants_gradients(self, step: int) -> bool:
        """Whether step ``step`` unmasks anything (if not, no gradient needs to be observed)."""
        return self.schedule(step) > 0

    # -------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``|grad| / (eps + |weight|) ** exp`` in float32, flattened (a new tensor)."""
        score = grad.detach().reshape(-1).float().abs()
        if self.exp != 0.0:
            denom = weight.detach().reshape(-1).float().abs().add_(self.eps)
            if self.exp != 1.0:
                denom.pow_(self.exp)
            score.div_(denom)
        return score

    @torch.no_grad()
    def observe(
        self,
        key: str,
        grad: torch.Tensor,
        weight: torch.Tensor,
        chosen: torch.Tensor | None = None,
        step: int | None = None,
    ) -> None:
        """Score one tensor and keep its own top-``n_t`` entries that are not chosen yet.

        Args:
            key: the tensor's name (e.g. ``"blocks.0.attn.qkv.weight"``).
            grad: its gradient (any shape; transient, not kept).
            weight: its current values, same number of elements.
            chosen: 1-D int64 flat indices already chosen (never picked again); None or empty for none.
            step: the optimizer step the choice is for; default :attr:`next_step`.

        Raises:
            ValueError: mismatched sizes or bad ``chosen`` indices.
        """
        step = self.next_step if step is None else step
        n = self.schedule(step)
        if n == 0:
            return
        if grad.numel() != weight.numel():
            raise ValueError(f"ID3 observe({key!r}): gradient has {grad.numel()} elements, weight {weight.numel()}")
        score = self.score(grad, weight)
        torch.nan_to_num_(score, nan=-1.0, posinf=-1.0, neginf=-1.0)  # below every finite score (scores are >= 0)
        taken = 0
        if chosen is not None and chosen.numel():
            if chosen.dtype != torch.long or chosen.dim() != 1:
                raise ValueError(f"ID3 observe({key!r}): chosen must be 1-D int64 flat indices, got {chosen.dtype}")
            chosen = chosen.to(score.device)
            if int(chosen.min()) < 0 or int(chosen.max()) >= score.numel():
                raise ValueError(f"ID3 observe({key!r}): chosen indices must be in [0, {score.numel()})")
            score[chosen] = -math.inf
            taken = chosen.unique().numel()
        k = min(n, score.numel() - taken)
        if k <= 0:
            empty = score[:0]
            self._candidates[key] = (step, empty, empty.long(), empty)
            return
        threshold = torch.topk(score, k, sorted=False).values.min()
        above = (score > threshold).nonzero().squeeze(1)
        ties = (score == threshold).nonzero().squeeze(1)[: k - above.numel()]  # lowest indices among ties
        index = torch.cat([above, ties]).sort().values
        flat_grad = grad.detach().reshape(-1)
        self._candidates[key] = (step, score[index], index, flat_grad[index.to(flat_grad.device)].float())

    def select(self, step: int) -> dict[str, torch.Tensor]:
        """The global top-``n_t`` of the observed candidates: ``{key: sorted flat indices}`` (keys with none left out).

        Also sets :attr:`selected_grads`, clears the candidates, and advances :attr:`next_step` to ``step + 1``.
        Fewer than ``n_t`` entries come back only if fewer candidates were observed.

        Raises:
            ValueError: candidates were observed for another step.
        """
        n = self.schedule(step)
        stale = sorted({s for s, *_ in self._candidates.values() if s != step})
        if stale:
            self._candidates.clear()
            raise ValueError(f"ID3 select(step={step}) but the gradients were observed for step(s) {stale}")
        keys = sorted(k for k, c in self._candidates.items() if c[2].numel())
        self.selected_grads = {}
        result: dict[str, torch.Tensor] = {}
        if n > 0 and keys:
            device = self._candidates[keys[0]][1].device
            parts = [self._candidates[k] for k in keys]
            scores = torch.cat([p[1].to(device) for p in parts])
            owner = torch.cat(
                [torch.full((p[2].numel(),), i, dtype=torch.long, device=device) for i, p in enumerate(parts)]
            )
            # candidates are laid out by (key order, index), so a stable sort on the score breaks ties by both
            order = torch.sort(scores, descending=True, stable=True).indices[:n]
            picked_owner = owner[order]
            offsets = torch.tensor([0] + [p[2].numel() for p in parts], device=device).cumsum(0)
            for i, key in enumerate(keys):
                local = (order[picked_owner == i] - offsets[i]).sort().values
                if local.numel():
                    _, _, index, grads = parts[i]
                    local = local.to(index.device)
                    result[key] = index[local]
                    self.selected_grads[key] = grads[local]
        self._candidates.clear()
        self.unmasked += sum(v.numel() for v in result.values())
        self.next_step = step + 1
        return result

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The configuration and the step bookkeeping (candidates are transient and not saved)."""
        return {
            "budget": self.budget,
            "total_steps": self.total_steps,
            "total_params": self.total_params,
            "eps": self.eps,
            "exp": self.exp,
            "next_step": self.next_step,
            "unmasked": self.unmasked,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuse one made with another configuration.

        Raises:
            ValueError: a configuration field differs; the message names the fields.
        """
        refuse_changed(self.state_dict(), state, "ID3 unmasker", keys=_CONFIG)
        self.next_step = int(state.get("next_step", self.next_step))
        self.unmasked = int(state.get("unmasked", self.unmasked))
        self._candidates.clear()
        self.selected_grads = {}
