"""ID³ and SaRA results in peft's SHiRA format, so that ``peft.PeftModel.from_pretrained`` reads them.

peft's SHiRA tuner (Sparse High Rank Adapters) holds, for an ``nn.Linear``, one flat parameter ``shira_weight``
of exactly ``r * (in_features + out_features)`` values and their (row, column) positions ``shira_indices``; its
forward adds ``sparse(indices, weight) * scaling`` (scaling 1) to the base weight. peft saves the indices in
``adapter_model.safetensors`` and reads them back from it (every release with SHiRA, 0.17 on; checked: 0.20.0 and
0.21.2 give identical outputs), so positions chosen by importance or magnitude survive, not only random ones.

How a sparse result (``<param>.indices`` + ``<param>.values``, see :mod:`lightning_peft.adapters.sparse`) maps on it:

* an ``nn.Linear`` whose only changed tensor is its ``weight`` becomes a SHiRA layer: its entries sorted by
  position, then padded with zero-valued entries at unselected positions up to ``r * (in + out)`` (a zero adds
  nothing). peft has one ``r`` per config (no per-layer pattern), so ``r`` is the smallest that holds the layer
  with the most entries per ``in + out``; a layer for which ``r * (in + out) > in * out`` cannot be a SHiRA layer;
* every other changed module (a Linear's bias, ``Conv2d``, ``Embedding``, ``LayerNorm``, transformers ``Conv1D``,
  such a too-dense Linear, and the modules trained in full, the result's ``modules_to_save``) is listed in
  ``modules_to_save`` and stored whole, with the result applied;
* a parameter that belongs to the model itself (e.g. a ViT's ``cls_token``) cannot be carried: peft saves
  modules, and wrapping the root is impossible; that is an error, which says to export merged instead.

``mask_type`` is written as ``"saved_indices"`` (a custom type, as peft's docs name theirs), not ``"random"``: peft
then draws no random mask at load time and the positions come from the file only (loaded with
``is_trainable=True``, peft warns that it does not know the type). ``target_modules`` is an exact regular
expression over the full module names (peft full-matches a string); ``modules_to_save`` are full names too,
checked not to be the end of any other module's name (peft picks modules to save by ``name.endswith(entry)``).

The padding costs file size, not accuracy: a layer with few entries is stored with ``r * (in + out)`` of them.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    >>> sparse = {"0.weight.indices": torch.tensor([1, 7]), "0.weight.values": torch.tensor([0.5, -0.5]),
    ...           "1.bias.indices": torch.tensor([2]), "1.bias.values": torch.tensor([1.0])}
    >>> config, tensors = shira_files(net, sparse)
    >>> config["r"], config["target_modules"], config["modules_to_save"]
    (1, '(?:0)', ['1'])
    >>> tensors["base_model.model.0.shira_indices"].tolist()
    [[0, 0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 0, 1, 3]]
    >>> tensors["base_model.model.0.shira_weight"].tolist()  # the two entries (flat 1 and 7), zeros elsewhere
    [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["SHIRA_MASK_TYPE", "shira_files"]

SHIRA_MASK_TYPE = "saved_indices"
_PREFIX = "base_model.model."


def _changed_modules(model: nn.Module, names: Sequence[str]) -> dict[str, set[str]]:
    """``{module name: {its parameter names}}`` for the given parameter names; a root parameter is refused."""
    own = dict(model.named_parameters(remove_duplicate=False))
    changed: dict[str, set[str]] = {}
    for name in names:
        if name not in own:
            raise ValueError(f"the result changes {name!r}, which {type(model).__name__} does not have")
        module, _, param = name.rpartition(".")
        if not module:
            raise ValueError(
                f"the result changes {name!r}, a parameter of the model itself rather than of one of its modules; "
                "peft saves whole modules, so SHiRA cannot carry it: export merged (format='auto') instead"
            )
        changed.setdefault(module, set()).add(param)
    return changed


def _rank(layers: dict[str, tuple[int, int, int]]) -> tuple[int, set[str]]:
    """One ``r`` for every SHiRA layer (``{name: (entries, in, out)}``), and the layers that cannot hold it."""
    left, dropped = dict(layers), set[str]()
    while left:
        r = max(math.ceil(n / (i + o)) for n, i, o in left.values()) or 1
        too_small = {k for k, (_, i, o) in left.items() if r * (i + o) > i * o}
        if not too_small:
            return r, dropped
        dropped |= too_small
        left = {k: v for k, v in left.items() if k not in too_small}
    return 1, dropped


def _padded(flat: torch.Tensor, values: torch.Tensor, total: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``flat``/``values`` (sorted) grown to ``total`` entries with zeros at the first unselected positions."""
    free = torch.ones(size, dtype=torch.bool)
    free[flat] = False
    extra = free.nonzero().view(-1)[: total - flat.numel()]
    positions = torch.cat([flat, extra])
    order = positions.argsort()
    padded = torch.cat([values.float(), values.new_zeros(extra.numel(), dtype=torch.float32)])
    return positions[order], padded[order]


@torch.no_grad()
def shira_files(
    merged: nn.Module,
    sparse: Mapping[str, torch.Tensor],
    dense: Sequence[str] = (),
    base_model_name_or_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` and ``adapter_model.safetensors`` contents of a sparse result in SHiRA form.

    Args:
        merged: the base model with the result applied (its modules to save are taken from it).
        sparse: the result's ``<param>.indices`` (int64, strictly increasing) / ``<param>.values`` (float) pairs.
        dense: names of the tensors the result trained in full.
        base_model_name_or_path: written into the config, as peft does.

    Raises:
        ValueError: a parameter of the model root is changed, nothing is a Linear weight SHiRA can hold, or a
            module to save would also match another module's name.
    """
    stems = sorted({key.rpartition(".")[0] for key in sparse})
    changed = _changed_modules(merged, [*stems, *dense])
    dense_owners = {name.rpartition(".")[0] for name in dense}
    candidates: dict[str, tuple[int, int, int]] = {}
    for module_name, params in changed.items():
        module = merged.get_submodule(module_name)
        if type(module) is nn.Linear and params == {"weight"} and module_name not in dense_owners:
            n = sparse[f"{module_name}.weight.indices"].numel()
            candidates[module_name] = (n, module.in_features, module.out_features)
    r, too_dense = _rank(candidates)
    shira = sorted(set(candidates) - too_dense)
    if not shira:
        raise ValueError(
            "no tensor of this result is the weight of an nn.Linear that peft's SHiRA can hold (it carries Linear "
            "weights only; a too dense one it cannot): export merged (format='auto') instead"
        )
    to_save = sorted(set(changed) - set(shira))
    for name in to_save:
        if any(inside.startswith(name + ".") for inside in shira):
            raise ValueError(
                f"the module {name!r} changed and holds SHiRA layers; peft cannot save it whole around them: "
                "export merged (format='auto') instead"
            )
        clash = [other for other, _ in merged.named_modules() if other != name and other.endswith(name)]
        if clash:
            raise ValueError(
                f"peft would also save {clash[0]!r} as a module to save, because its name ends with {name!r}; "
                "SHiRA cannot hold this result exactly: export merged (format='auto') instead"
            )
    tensors: dict[str, torch.Tensor] = {}
    for name in shira:
        _, fan_in, fan_out = candidates[name]
        flat = sparse[f"{name}.weight.indices"].long().cpu()
        positions, values = _padded(
            flat, sparse[f"{name}.weight.values"].cpu(), r * (fan_in + fan_out), fan_in * fan_out
        )
        tensors[f"{_PREFIX}{name}.shira_weight"] = values.contiguous()
        tensors[f"{_PREFIX}{name}.shira_indices"] = torch.stack([positions // fan_in, positions % fan_in]).to(
            torch.int32
        )
    for name in to_save:
        for key, value in merged.get_submodule(name).state_dict().items():
            tensors[f"{_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    config = {
        "peft_type": "SHIRA",
        "r": r,
        "mask_type": SHIRA_MASK_TYPE,
        "random_seed": None,
        "target_modules": "(?:" + "|".join(re.escape(n) for n in shira) + ")",
        "modules_to_save": to_save or None,
        "fan_in_fan_out": False,
        "init_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "task_type": None,
        "peft_version": "0.21.0",
    }
    return config, tensors
