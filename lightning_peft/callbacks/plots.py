"""Pictures of what a method decided, written next to the adapter (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from lightning_peft.fileio import staged_file

__all__ = ["plot_density", "plot_layer_counts", "plot_ranks", "plot_ssf", "rank_grid"]


def rank_grid(ranks: Mapping[str, float]) -> tuple[list[str], list[int], list[list[float]]]:
    """Arrange ``layer name -> rank`` as rows (module kind, e.g. ``self_attn.q_proj``) x columns (block index).

    A name's block index is its first purely numeric component; names without one share column 0.
    Missing cells are NaN.
    """
    cells: dict[tuple[str, int], float] = {}
    for name, rank in ranks.items():
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if re.fullmatch(r"\d+", part)), None)
        if index is None:
            kind, block = name, 0
        else:
            kind, block = ".".join(parts[index + 1 :]) or name, int(parts[index])
        cells[(kind, block)] = rank
    kinds = list(dict.fromkeys(k for k, _ in cells))
    blocks = sorted({b for _, b in cells})
    grid = [[float(cells.get((k, b), float("nan"))) for b in blocks] for k in kinds]
    return kinds, blocks, grid


def plot_ranks(
    ranks: dict[str, int], history: list[tuple[int, int]], max_rank: int, target_budget: int, path: str | os.PathLike
) -> Path:
    """Heatmap of the final rank per layer (module kind x block) and the budget over optimizer steps, as a PNG.

    Args:
        ranks: final rank per layer name.
        history: ``(optimizer step, total budget)`` at every masking step.
        max_rank: the initial rank (top of the colour scale).
        target_budget: the final budget (a dashed line).
        path: the PNG to write (atomically).
    """
    plt = _pyplot()
    kinds, blocks, grid = rank_grid(ranks)
    fig, (ax_map, ax_budget) = plt.subplots(
        1, 2, figsize=(4 + 0.45 * len(blocks) + 4, 1.5 + 0.4 * len(kinds)), gridspec_kw={"width_ratios": [3, 2]}
    )
    image = ax_map.imshow(grid, cmap="viridis", vmin=0, vmax=max_rank, aspect="auto")
    ax_map.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    ax_map.set_yticks(range(len(kinds)), kinds)
    ax_map.set_xlabel("block")
    ax_map.set_title("AdaLoRA: final rank per layer")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax_map.text(j, i, f"{int(value)}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax_map, fraction=0.046)
    if history:
        steps, budgets = zip(*history, strict=True)
        ax_budget.plot(steps, budgets, marker=".")
    ax_budget.axhline(target_budget, color="grey", linestyle="--", label="target")
    ax_budget.set_xlabel("optimizer step")
    ax_budget.set_ylabel("total rank budget")
    ax_budget.set_title("budget schedule")
    ax_budget.legend()
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    plt = _pyplot()
    fig.tight_layout()
    try:
        with staged_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _common_prefix(names: list[str]) -> str:
    """The longest dotted prefix all names share (``"model.layers."`` for ``model.layers.0``, ``model.layers.1``)."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    shared = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return ".".join(shared) + "." if shared else ""


def plot_layer_counts(names: list[str], counts: list[int], n_layers: int, path: str | os.PathLike) -> Path:
    """LISA: how many optimizer steps each block trained, against the uniform expectation, as a PNG."""
    plt = _pyplot()
    prefix = _common_prefix(names)
    labels = [n[len(prefix) :] for n in names]
    expected = sum(counts) / max(len(names), 1)  # every step trains n_layers blocks: the mean per block
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.45 * len(labels)), 3.6))
    ax.bar(range(len(counts)), counts, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if max(map(len, labels), default=0) > 4 else 0, fontsize=8)
    ax.axhline(expected, color="grey", linestyle="--", label="uniform expectation")
    ax.legend(fontsize=8)
    ax.set_xlabel(f"block ({prefix.rstrip('.') or 'blocks'})")
    ax.set_ylabel("optimizer steps trained")
    ax.set_title(f"LISA: {n_layers} of {len(names)} blocks at a time", fontsize=10)
    return _save(fig, path)


def plot_density(density: dict[str, float], title: str, path: str | os.PathLike) -> Path:
    """Share of each layer's entries trained, as a heatmap (module kind x block), in percent, as a PNG."""
    plt = _pyplot()
    kinds, blocks, grid = rank_grid({n: 100.0 * d for n, d in density.items()})
    fig, ax = plt.subplots(
        figsize=(3 + 0.5 * len(blocks) + 0.05 * max(map(len, kinds), default=0), 1.4 + 0.4 * len(kinds))
    )
    top = max((v for row in grid for v in row if v == v), default=1.0)
    image = ax.imshow(grid, cmap="magma", vmin=0, vmax=max(top, 1e-9), aspect="auto")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(
                    j, i, f"{value:.1f}", ha="center", va="center", color="w" if value < top / 2 else "k", fontsize=7
                )
    fig.colorbar(image, ax=ax, fraction=0.046, label="% of entries trained")
    return _save(fig, path)


def plot_ssf(scale_change: dict[str, float], shift: dict[str, float], path: str | os.PathLike) -> Path:
    """SSF: how far each layer's learned scale moved from 1 and its shift from 0 (mean absolute value per layer,
    module kind x block), two heatmaps side by side, as a PNG."""
    plt = _pyplot()
    panels = [(scale_change, "mean |scale - 1|"), (shift, "mean |shift|")]
    kinds, blocks, _ = rank_grid(scale_change)
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * (2.5 + 0.5 * len(blocks)) + 0.1 * max(map(len, kinds), default=0), 1.4 + 0.4 * len(kinds))
    )
    for ax, (values, title) in zip(axes, panels, strict=True):
        kinds, blocks, grid = rank_grid(values)
        top = max((v for row in grid for v in row if v == v), default=1.0)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(top, 1e-12), aspect="auto")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
        ax.set_xlabel("block")
        ax.set_title(f"SSF: {title}", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_group_steps(
    blocks: list[str], members: list[tuple[int, str]], counts: list[int], steps: int, path: str | os.PathLike
) -> Path:
    """HFT: how many optimizer steps each parameter group (row) of each block (column) trained, as a PNG.

    Args:
        blocks: the blocks' names, in order (the columns).
        members: per unit, ``(block index, member name inside the block)``; the member names are the rows.
        counts: per unit, the optimizer steps it trained.
        steps: the top of the colour scale (the most steps any group trained).
        path: the PNG to write.
    """
    plt = _pyplot()
    kinds = list(dict.fromkeys(kind for _, kind in members))
    grid = [[float("nan")] * len(blocks) for _ in kinds]
    for (block, kind), count in zip(members, counts, strict=True):
        grid[kinds.index(kind)][block] = float(count)
    prefix = _common_prefix(blocks)
    labels = [b[len(prefix) :] or b for b in blocks]
    fig, ax = plt.subplots(
        figsize=(3 + 0.5 * len(blocks) + 0.05 * max(map(len, kinds), default=0), 1.4 + 0.35 * len(kinds))
    )
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(steps, 1), aspect="auto")
    ax.set_xticks(range(len(blocks)), labels, rotation=90 if max(map(len, labels), default=0) > 4 else 0, fontsize=8)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel(f"block ({prefix.rstrip('.') or 'blocks'})")
    ax.set_title("HFT: optimizer steps each parameter group trained", fontsize=10)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                color = "w" if value < max(steps, 1) / 2 else "k"
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color=color, fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, label="optimizer steps trained")
    return _save(fig, path)
