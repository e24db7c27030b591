"""HFT's half selection (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466,
ACL 2025), pure torch: which half of every parameter group of every block trains in a round.

The paper's *category-level* selection (its Figure 2, on Llama 2), per transformer block:

* self-attention: 2 of the 4 matrices ``W_Q, W_K, W_V, W_O`` train, the other 2 stay frozen;
* feed-forward: of the 3 matrices ``W_gate, W_up, W_down``, 2 train in a random half of the blocks and 1 in the
  other half, so that half of the feed-forward matrices of the model train;
* the two norms: one trains;
* the embeddings and the LM head train (outside the blocks: the callback's always-on modules).

Generalised here to any block whose parameters are split into *categories* (attention, feed-forward, norms, ...),
each holding ``n`` *members* (a member is a module, e.g. ``self_attn.q_proj``, with all its parameters):

* ``n`` even: exactly ``n / 2`` members of the category train in every block;
* ``n`` odd: of the ``B`` blocks where the category has ``n`` members, a random ``⌊B / 2⌋`` train ``⌈n / 2⌉`` members
  and the others ``⌊n / 2⌋``. With ``B`` even that is exactly half of the category's members in the model; with
  ``B`` odd one member fewer than half (the frozen half is never the smaller one). A category of one member in one
  block never trains.

Which members (and which blocks take the larger share) is drawn uniformly, per *round*, from a generator seeded by
``(seed, round)`` (:func:`lightning_peft.seeding.seeded_generator`): every rank draws the same half without
communicating, a resumed run draws what the uninterrupted run drew, and the global RNG is never touched. The paper
selects once per fine-tuning stage (SFT, DPO, each task of a continual-learning sequence): ``interval=None``, one
round for the whole run; an ``interval`` redraws every ``interval`` optimizer steps, as LISA does.

The ``HFT`` callback (:mod:`lightning_peft.callbacks.hft`) finds the categories in a model and drives this core
through the freezing machinery it shares with LISA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.methods._config import refuse_changed
from lightning_peft.seeding import seeded_generator

__all__ = ["OTHER", "HalfSelector", "group_block"]

#: the category of a block's parameters that no other category matched (halved like the others)
OTHER = "other"
#: the rule behind the draws; a checkpoint with another rule cannot be replayed
RULE = "category-half"


class HalfSelector:
    """The trained half of every category of every block, per round.

    Units are numbered block by block, category by category, member by member (the order of ``layout``).

    Args:
        layout: ``layout[b][c]`` is the number of members of category ``c`` in block ``b`` (0 where the block has
            none); every block lists the same categories.
        interval: optimizer steps per round, ``>= 1``; None: one round for the whole run (the paper's rule).
        seed: seed of the draws.

    Raises:
        ValueError: no block, blocks with different numbers of categories, a negative count, a block without
            members, or ``interval < 1``.

    Example:
        >>> selector = HalfSelector([[4, 3, 2], [4, 3, 2]], seed=0)  # two Llama blocks: attention, feed-forward, norms
        >>> [sum(c) for c in zip(*selector.trained_counts(0))]  # per category, over both blocks
        [4, 3, 2]
        >>> selector.active(0) == selector.active(10_000)  # interval=None: one round
        True
    """

    def __init__(self, layout: Sequence[Sequence[int]], interval: int | None = None, seed: int = 0) -> None:
        layout = [[int(n) for n in block] for block in layout]
        if not layout:
            raise ValueError("HFT needs at least one block")
        if len({len(block) for block in layout}) != 1:
            raise ValueError(f"HFT: every block must list the same categories, got {[len(b) for b in layout]} counts")
        if any(n < 0 for block in layout for n in block) or any(sum(block) == 0 for block in layout):
            raise ValueError(f"HFT: member counts must be >= 0 and every block must have some, got {layout}")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(
                f"HFT interval must be None (one round) or an integer >= 1 optimizer step, got {interval!r}"
            )
        self.layout, self.interval, self.seed = layout, interval, seed
        offsets, start = [], 0
        for block in layout:
            row = []
            for n in block:
                row.append(start)
                start += n
            offsets.append(row)
        self.offsets, self.n_units = offsets, start

    def interval_index(self, step: int) -> int:
        """The round an optimizer step (0-based) belongs to (always 0 with ``interval=None``)."""
        return 0 if self.interval is None else step // self.interval

    def round_start(self, step: int) -> int:
        """The first optimizer step of the round ``step`` belongs to."""
        return 0 if self.interval is None else self.interval_index(step) * self.interval

    def trained_counts(self, round_index: int) -> list[list[int]]:
        """How many members of each category of each block train in round ``round_index``."""
        return self._draw(round_index)[0]

    def trained(self, round_index: int) -> list[list[list[int]]]:
        """``trained(k)[b][c]``: sorted indices of the members of category ``c`` of block ``b`` training in round k."""
        return self._draw(round_index)[1]

    def active(self, step: int) -> list[int]:
        """Sorted unit indices that train at optimizer step ``step`` (0-based)."""
        chosen = self.trained(self.interval_index(step))
        return sorted(
            self.offsets[b][c] + m for b, block in enumerate(chosen) for c, ms in enumerate(block) for m in ms
        )

    def _draw(self, round_index: int) -> tuple[list[list[int]], list[list[list[int]]]]:
        gen = seeded_generator(self.seed, round_index)
        counts = [[n // 2 for n in block] for block in self.layout]
        odd: dict[tuple[int, int], list[int]] = {}  # (category, size) -> blocks where it is odd
        for b, block in enumerate(self.layout):
            for c, n in enumerate(block):
                if n % 2:
                    odd.setdefault((c, n), []).append(b)
        for (c, n), blocks in sorted(odd.items()):
            for i in torch.randperm(len(blocks), generator=gen)[: len(blocks) // 2].tolist():
                counts[blocks[i]][c] = n // 2 + 1
        members = [
            [sorted(torch.randperm(n, generator=gen)[:k].tolist()) for n, k in zip(block, ks, strict=True)]
            for block, ks in zip(self.layout, counts, strict=True)
        ]
        return counts, members

    def state_dict(self) -> dict[str, Any]:
        """The configuration: with it, any round's draw can be replayed exactly."""
        return {"layout": [list(b) for b in self.layout], "interval": self.interval, "seed": self.seed, "rule": RULE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a state that would draw differently (a resumed run must replay the same halves).

        Raises:
            ValueError: the saved configuration differs; the message names the fields.
        """
        refuse_changed(self.state_dict(), state, "HFT selector")


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def group_block(block: nn.Module, groups: Mapping[str, Sequence[str]]) -> dict[str, dict[str, list[str]]]:
    """Sort the parameters of one block into categories of members.

    An entry of ``groups[category]`` matches a module name ``n`` (relative to the block) as peft's
    ``target_modules`` list does: ``n == entry`` or ``n`` ends with ``"." + entry``. A matched module that holds
    parameters is one member (with all its parameters; what it contains is not matched again). A module matched by
    entries of several categories goes to the category of the longest matching entry. The block's parameters no
    member holds go to :data:`OTHER`, one member per module that holds them directly (a parameter of the block
    itself is a member on its own).

    Args:
        block: one repeated block.
        groups: category name -> entries, e.g. ``{"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], ...}``.

    Returns:
        category -> {member name -> its parameter names}, names relative to the block, in the order of ``groups``
        (then :data:`OTHER`); categories without members are left out.

    Raises:
        ValueError: a module matched by equally long entries of two categories.

    Example:
        >>> block = nn.ModuleDict({"q": nn.Linear(2, 2), "k": nn.Linear(2, 2), "norm": nn.LayerNorm(2)})
        >>> {c: list(m) for c, m in group_block(block, {"attention": ["q", "k"]}).items()}
        {'attention': ['q', 'k'], 'other': ['norm']}
    """
    found: dict[str, dict[str, list[str]]] = {category: {} for category in groups}
    held: set[str] = set()
    for name, module in block.named_modules():
        if not name or any(name.startswith(m + ".") for members in found.values() for m in members):
            continue
        scores = {c: max((len(e) for e in entries if _matches(name, e)), default=-1) for c, entries in groups.items()}
        best = sorted(((score, c) for c, score in scores.items() if score >= 0), reverse=True)
        params = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if not best or not params:
            continue
        if len(best) > 1 and best[0][0] == best[1][0]:
            raise ValueError(
                f"HFT: the module {name!r} of a block matches entries of the categories {best[0][1]!r} and "
                f"{best[1][1]!r} equally well; make the entries longer (e.g. 'attention.output.dense')"
            )
        found[best[0][1]][name] = params
        held.update(params)
    other = found.setdefault(OTHER, {})
    for name, _ in block.named_parameters():
        if name not in held:
            other.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return {c: members for c, members in found.items() if members}
