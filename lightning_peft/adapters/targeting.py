"""Which modules of a model get an adapter: peft's matching rules, a dry run and helpful errors.

Semantics (the same as peft's ``check_target_module_exists``):

* ``target_modules`` as a **string** is a regular expression ``re.fullmatch``-ed against each
  module's dotted name (``"blocks\\.\\d+\\.attn\\.qkv"``).
* as a **list** each entry matches a name exactly or as a dotted suffix: ``"qkv"`` matches
  ``"blocks.0.attn.qkv"``; ``"attn.qkv"`` does too; ``"kv"`` does not.
* ``"all-linear"`` selects every ``nn.Linear`` / ``Conv1D`` except the output layer named in
  ``exclude_modules`` or, when there is none, the model's last linear layer (as in peft).
* ``exclude_modules`` uses the same two forms and always wins.

A matched quantized layer with no adapter (torchao, HQQ, GPTQ/AWQ-style, ...; see :mod:`.quantized`)
is an error that names what is supported (bitsandbytes 4-bit and 8-bit Linear), never a silent skip.

Only layer types an adapter exists for are adapted; a name that matches a container (an attention
block, say) is reported as skipped by :func:`dry_run` instead of silently doing nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_peft.adapters.quantized import bnb_kind, check_quantization, quantization_of

__all__ = [
    "TargetMatch",
    "TargetNotFoundError",
    "dry_run",
    "is_conv1d",
    "is_supported_layer",
    "match_targets",
    "name_matches",
]

Targets = str | Sequence[str] | None


class TargetNotFoundError(ValueError):
    """No module of the model matched ``target_modules``."""


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's transposed linear), without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_supported_layer(module: nn.Module) -> bool:
    """Whether a LoRA layer exists for ``module``'s type (``nn.Linear``, ``nn.Conv2d``, transformers ``Conv1D``)."""
    return isinstance(module, nn.Linear | nn.Conv2d) or is_conv1d(module)


def name_matches(name: str, targets: Targets) -> bool:
    """peft's rule: a string is ``re.fullmatch``-ed; a list entry matches exactly or as a ``.suffix``."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class TargetMatch:
    """The outcome of matching: what gets an adapter, what matched but cannot, what was excluded.

    Attributes:
        matched: dotted names of the supported layers that will be adapted, in model order.
        skipped: ``(name, type)`` of modules whose name matched but whose type has no adapter.
        excluded: names that matched a target but also ``exclude_modules``.
        unused_entries: list entries of ``target_modules`` that matched no module at all.
        types: ``name -> class name`` for every matched layer.
    """

    matched: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    unused_entries: list[str] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A readable table of the match, one line per adapted layer, then what was skipped."""
        lines = [f"{len(self.matched)} module(s) matched:"]
        lines += [f"  {n}  ({self.types[n]})" for n in self.matched]
        if self.skipped:
            lines.append(f"{len(self.skipped)} matched but have no adapter for their type (skipped):")
            lines += [f"  {n}  ({t})" for n, t in self.skipped]
        if self.excluded:
            lines.append(f"{len(self.excluded)} excluded by exclude_modules:")
            lines += [f"  {n}" for n in self.excluded]
        if self.unused_entries:
            lines.append(f"target entries that matched nothing: {', '.join(self.unused_entries)}")
        return "\n".join(lines)


def _last_linear(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            last = name
    return last


def match_targets(model: nn.Module, target_modules: Targets, exclude_modules: Targets = None) -> TargetMatch:
    """Match ``target_modules`` against ``model`` (names relative to ``model``).

    Args:
        model: the module whose submodules are searched.
        target_modules: a regex (``re.fullmatch``), a list of names/suffixes, or ``"all-linear"``.
        exclude_modules: same forms; a name that matches it is never adapted.

    Returns:
        A :class:`TargetMatch`; nothing is changed in the model.

    Raises:
        TargetNotFoundError: nothing supported matched; the message lists candidate layer names.
        TypeError: a matched layer is quantized in a way no adapter exists for (the message names what is).
        ValueError: ``target_modules`` is empty or of the wrong type, or the regex does not compile.
    """
    if not isinstance(target_modules, str | list | tuple):
        raise ValueError(f"target_modules must be a str or a list of str, got {type(target_modules).__name__}")
    if len(target_modules) == 0:
        raise ValueError("target_modules is empty: pass a regex, a list of module names/suffixes, or 'all-linear'")
    for pattern in (target_modules, exclude_modules):
        if isinstance(pattern, str) and pattern != "all-linear":
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"target/exclude regex {pattern!r} does not compile: {err}") from err

    all_linear = target_modules == "all-linear"
    if all_linear and exclude_modules is None:
        last = _last_linear(model)
        exclude_modules = [last] if last else None

    result = TargetMatch()
    used: set[str] = set()
    refused: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name:
            continue
        linear = isinstance(module, nn.Linear) or is_conv1d(module) or _quantized_linear(module)
        if not (linear if all_linear else name_matches(name, target_modules)):
            continue
        if not isinstance(target_modules, str):
            used.update(t for t in target_modules if name_matches(name, [t]))
        if name_matches(name, exclude_modules):
            result.excluded.append(name)
        elif bnb_kind(module) is None and quantization_of(module) is not None:
            refused.append((name, module))
        elif is_supported_layer(module):
            result.matched.append(name)
            result.types[name] = type(module).__name__
        else:
            result.skipped.append((name, type(module).__name__))
    if refused:
        _refuse_quantized(refused)
    # A layer inside an adapted layer (its base_layer) is never a second target.
    result.matched = [n for n in result.matched if not any(n.startswith(m + ".") for m in result.matched)]
    if not isinstance(target_modules, str):
        result.unused_entries = [t for t in target_modules if t not in used]
    if not result.matched:
        raise TargetNotFoundError(_not_found_message(model, target_modules, exclude_modules, result))
    return result


def _quantized_linear(module: nn.Module) -> bool:
    """A quantized linear layer that is no ``nn.Linear`` (HQQ, GPTQ/AWQ ``QuantLinear``): "all-linear" sees it too."""
    return "Linear" in type(module).__name__ and quantization_of(module) is not None


def _refuse_quantized(refused: list[tuple[str, nn.Module]]) -> None:
    name, module = refused[0]
    try:
        check_quantization(module, name)
    except TypeError as err:
        more = f" ({len(refused) - 1} more matched layer(s) are quantized alike)" if len(refused) > 1 else ""
        raise TypeError(f"{err}{more}") from None


def _not_found_message(model: nn.Module, targets: Targets, exclude: Targets, result: TargetMatch) -> str:
    candidates = [n for n, m in model.named_modules() if n and is_supported_layer(m)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    msg = [f"target_modules={targets!r} matched no adaptable layer of {type(model).__name__}."]
    if result.skipped:
        msg.append(
            "It matched only modules of unsupported types: " + ", ".join(f"{n} ({t})" for n, t in result.skipped[:10])
        )
    if result.excluded:
        msg.append(f"These matched but are excluded by exclude_modules={exclude!r}: {', '.join(result.excluded[:10])}")
    if candidates:
        shown = ", ".join(candidates[:20]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 20 else "")
        msg.append(f"Adaptable layers (Linear/Conv2d/Conv1D) are: {shown}.")
        msg.append(f"As list entries, these suffixes would match: {suffixes[:30]}.")
    else:
        msg.append("The model has no Linear, Conv2d or Conv1D layer at all.")
    return "\n".join(msg)


def dry_run(model: nn.Module, target_modules: Targets, exclude_modules: Targets = None) -> str:
    """Show what :func:`match_targets` would adapt, without touching the model.

    Example:
        >>> from torch import nn
        >>> print(dry_run(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["0"]))
        1 module(s) matched:
          0  (Linear)
    """
    return match_targets(model, target_modules, exclude_modules).summary()
