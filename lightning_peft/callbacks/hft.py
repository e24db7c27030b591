"""The ``HFT`` callback: half of every parameter group of every block trains, the other half keeps its pre-trained
values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from typing_extensions import override

from lightning_peft.backbones import Blocks, Preset
from lightning_peft.callbacks.scheduled import ScheduledSelection
from lightning_peft.methods.hft import OTHER, HalfSelector, group_block
from lightning_peft.strategies import check_dynamic_strategy

__all__ = ["HFT"]


class HFT(ScheduledSelection):
    """Half Fine-Tuning (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466) as a callback.

    In every round half of the parameters of each repeated block train and the other half stay frozen at their
    pre-trained values, to limit forgetting; the embeddings, final norm and head (the *always-on* modules) train
    throughout, as in the paper. The half is taken *per category* (the paper's category-level selection): in every
    block 2 of the 4 attention matrices ``q, k, v, o`` train; of the 3 feed-forward matrices ``gate, up, down`` 2 train
    in a random half of the blocks and 1 in the others; 1 of the 2 norms trains. In general a category of ``n``
    members (modules) trains ``n / 2`` of them in each block, and for odd ``n`` a random ``⌊B / 2⌋`` of the ``B``
    blocks train ``⌈n / 2⌉`` and the others ``⌊n / 2⌋`` (:class:`~lightning_peft.methods.hft.HalfSelector` states
    the rule). The draw of round ``k`` comes from a generator seeded by ``(seed, k)``: identical on every rank,
    replayed on resume, the global RNG untouched.

    Rounds: the paper draws once per fine-tuning stage (an SFT run, a DPO run, each task of a continual-learning
    sequence), so the default ``interval=None`` keeps one half for the whole fit; for the next stage fit again with
    another ``seed``. ``interval=N`` redraws every ``N`` optimizer steps (a parameter that goes frozen then loses its
    gradient and optimizer state, as in LISA; one drawn again starts with fresh optimizer state).

    The categories come from the backbone preset (Llama and its kin, Phi-3, GPT-2, timm ViT, AST, wav2vec 2.0,
    Whisper; ``lightning_peft.backbones``), or from ``groups`` for any other model. Block parameters no category
    matches (a layer scale, a bias on the block itself) form one more category, ``"other"``, halved the same way.

    Hooks and multi-process behaviour are LISA's (:class:`~lightning_peft.callbacks.scheduled.ScheduledSelection`,
    the code both share): ``setup`` groups the parameters and freezes the backbone but the groups and the always-on
    modules (the optimizer is built from all of them), ``on_train_start`` applies the first draw,
    ``on_train_batch_start`` switches at round boundaries of optimizer steps. Plain ``strategy="ddp"`` is refused
    before training with what it would do; use ``strategy="ddp_selective"``, or FSDP2 (``ModelParallelStrategy``,
    data parallel, the model sharded by :func:`lightning_peft.shard`).

    Saving: every tensor that trained (always-on modules and groups trained at least one step) as a dense weight
    delta with the base fingerprint taken before training, and ``hft_groups.png`` (per block, the steps each group
    trained); the folder is a zoo entry.

    Args:
        interval: optimizer steps per round, ``>= 1``; None (default): one round for the whole fit (the paper's).
        seed: seed of the draws.
        groups: category name -> module names inside a block (peft list semantics: an entry matches a module name
            exactly or as a ``".suffix"``), e.g. ``{"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "feed_forward": ["fc1", "fc2"], "norm": ["norm1", "norm2"]}``; default: the backbone preset's.
        block_path: dotted path of the ``nn.ModuleList`` of blocks (several joined by ``"+"``); default: the preset's,
            else the largest list of same-type blocks.
        always_on: modules or parameters that always train; default: the preset's embeddings, final norm and head,
            and on a model no preset knows every backbone parameter outside the blocks.
        backbone: dotted path of the backbone inside the ``LightningModule``; default: detected.
        save_dir: folder to write the trained tensors (dense delta) and ``hft_groups.png`` to at the end of fit.

    Raises:
        ValueError: ``interval`` not None and < 1, ``groups`` not a non-empty mapping of non-empty name lists, a
            model whose groups are unknown (no preset groups and no ``groups``; the message lists the block's
            modules), a category of ``groups`` that matches nothing (same list), a block where no category matches,
            a ``block_path`` or ``always_on`` name that does not exist, an optimizer without some group, a
            checkpoint of another configuration, or FSDP2 misuse as for LISA.
        NotImplementedError: plain DDP (use ``ddp_selective``), FSDP1, DeepSpeed, tensor parallelism.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[HFT(seed=0)], logger=False)
    """

    method = "hft"
    core_key = "selector"
    unit_word = "parameter groups"

    def __init__(
        self,
        interval: int | None = None,
        seed: int = 0,
        groups: dict[str, list[str]] | None = None,
        block_path: str | None = None,
        always_on: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
    ) -> None:
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(
                f"HFT interval must be None (one round) or an integer >= 1 optimizer step, got {interval!r}"
            )
        if groups is not None and (
            not isinstance(groups, dict)
            or not groups
            or not all(isinstance(c, str) and c for c in groups)
            or not all(
                isinstance(v, list | tuple) and v and all(isinstance(e, str) and e for e in v) for v in groups.values()
            )
        ):
            raise ValueError(
                "HFT groups must map category names to non-empty lists of module names inside a block, e.g. "
                f'{{"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "feed_forward": ["fc1", "fc2"]}}; '
                f"got {groups!r}"
            )
        super().__init__(seed=seed, block_path=block_path, always_on=always_on, backbone=backbone, save_dir=save_dir)
        self.interval = interval
        self.groups = {c: list(v) for c, v in groups.items()} if groups is not None else None
        self.categories: list[str] = []
        self._layout: list[list[int]] = []
        self._members: list[tuple[int, str]] = []  # per unit: (block index, member name inside the block)
        self._blocks_seen: list[str] = []

    @property
    def selector(self) -> HalfSelector | None:
        """The half selector of the groups set up (None before ``setup``)."""
        return self.core  # type: ignore[no-any-return]

    @override
    def _check_strategy(self, strategy: object) -> None:
        check_dynamic_strategy(strategy, "HFT", trainable_changes=True, sharded_ok=True)

    @override
    def _find_units(self, root: nn.Module, blocks: Blocks, preset: Preset | None) -> tuple[list[str], list[list[str]]]:
        groups = self.groups if self.groups is not None else dict(preset.groups) if preset is not None else None
        if not groups:
            family = f"the {preset.family} preset has" if preset else f"{type(root).__name__} has no preset, so it has"
            raise ValueError(
                f"HFT does not know the parameter groups of the blocks of {blocks.path}: {family} no HFT groups. Pass "
                f"groups={{category: [module names inside a block]}}; {_modules_hint(blocks)}"
            )
        grouped = [group_block(module, groups) for module in blocks.modules]
        unmatched = [c for c in groups if not any(c in g for g in grouped)]
        if self.groups is not None and unmatched:
            raise ValueError(f"HFT groups {unmatched} match no module of any block; {_modules_hint(blocks)}")
        bare = [blocks.names[b] for b, g in enumerate(grouped) if list(g) == [OTHER]]
        if bare:
            raise ValueError(f"HFT groups match no module of the block(s) {bare}; {_modules_hint(blocks)}")
        self.categories = [c for c in [*groups, OTHER] if any(c in g for g in grouped)]
        self._layout = [[len(g.get(c, {})) for c in self.categories] for g in grouped]
        names = {id(p): n for n, p in root.named_parameters()}
        unit_names, unit_params, self._members = [], [], []
        for b, (block_name, module, g) in enumerate(zip(blocks.names, blocks.modules, grouped, strict=True)):
            own = dict(module.named_parameters())
            for category in self.categories:
                for member, params in g.get(category, {}).items():
                    unit_names.append(f"{block_name}.{member}")
                    unit_params.append([names[id(own[p])] for p in params])
                    self._members.append((b, member))
        self._blocks_seen = list(blocks.names)
        return unit_names, unit_params

    @override
    def _make_core(self) -> HalfSelector:
        return HalfSelector(self._layout, self.interval, self.seed)

    @override
    def _describe(self, blocks: Blocks, always: str) -> str:
        rounds = "one round for the whole fit" if self.interval is None else f"a new half every {self.interval} steps"
        sizes = ", ".join(f"{c} {self._layout[0][i]}" for i, c in enumerate(self.categories))
        return f"half of each group ({sizes} per block) of {len(blocks)} blocks of {blocks.path}, {rounds}; " + (
            f"always on: {always}"
        )

    @override
    def hyperparameters(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "seed": self.seed,
            "groups": self.groups,
            "block_path": self.block_path,
            "always_on": self.always_on_names,
        }

    @override
    def schedule(self) -> dict[str, Any]:
        return {
            "groups": self.unit_names,
            "categories": self.categories,
            "steps_trained": list(self.counts),
            "rounds": len(self.history),
        }

    @override
    def write_pictures(self, folder: Path) -> list[Path]:
        if not self.unit_names:
            return []
        from lightning_peft.callbacks.plots import plot_group_steps  # matplotlib only when a picture is wanted

        steps = max(self.counts, default=0)  # a group trained in every round trained every step
        path = folder / "hft_groups.png"
        return [plot_group_steps(self._blocks_seen, self._members, self.counts, steps, path)]


def _modules_hint(blocks: Blocks) -> str:
    """The modules of the first block that hold parameters: what a ``groups`` entry could match."""
    first = blocks.modules[0]
    names = [n for n, m in first.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    return f"the modules holding parameters in {blocks.names[0]} are: {', '.join(names) or 'none'}"
