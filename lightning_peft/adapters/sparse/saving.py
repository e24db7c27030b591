"""Saving learned sparse deltas (``indices`` + ``values`` per tensor) and adding them onto a plain base model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_peft.adapters.sparse.model import sparse_bank, sparse_layers
from lightning_peft.adapters.sparse.shards import _no_dtensor


# ------------------------------------------------------------------------------------------------ saving
@torch.no_grad()
def sparse_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned deltas: ``<module>.<param>.indices`` (int64, strictly increasing) and ``.values`` (float32).

    Values are differences from the pretrained values; tensors without any selected entry are left out.
    Tensors are detached and stay on the model's device.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in sparse_layers(model):
        for pname in layer.param_names:
            indices, values = layer.delta(pname)
            if indices.numel():
                out[f"{name}.{pname}.indices"] = indices.contiguous()
                out[f"{name}.{pname}.values"] = values.contiguous()
    return out


def apply_sparse_delta(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Add sparse deltas (from :func:`sparse_state_dict`) into a plain base model; everything is checked first.

    ``W.view(-1)[indices] = (W.view(-1)[indices].float() + values).to(W.dtype)``, which reproduces the trained
    weights exactly when ``model`` holds the same pretrained values.

    Args:
        model: the base model, without sparse layers.
        tensors: ``{"<param name>.indices": int64, "<param name>.values": float}`` pairs.
        strict: a parameter the model does not have is an error (True) or skipped (False).

    Returns:
        The parameter names that were changed, sorted.

    Raises:
        ValueError: a malformed key, a missing half of a pair, an unknown parameter (strict), indices that are not
            1-D int64, strictly increasing and within the tensor, values of another length, not floating or not
            finite. Nothing is written then.

    Example:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.zero_()
        >>> apply_sparse_delta(net, {"weight.indices": torch.tensor([1, 2]), "weight.values": torch.tensor([1.0, 2.0])})
        ['weight']
        >>> net.weight.tolist()
        [[0.0, 1.0], [2.0, 0.0]]
    """
    if any(True for _ in sparse_layers(model)) or sparse_bank(model) is not None:
        raise ValueError(
            "apply_sparse_delta loads onto a plain base model, but this one has sparse layers; "
            "call remove_sparse(model) first or load onto a fresh base model"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, kind = key.rpartition(".")
        if not stem or kind not in ("indices", "values"):
            raise ValueError(f"sparse delta key {key!r} must be '<param name>.indices' or '<param name>.values'")
        pairs.setdefault(stem, {})[kind] = tensor
    own = dict(model.named_parameters(remove_duplicate=False))
    todo: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for stem, pair in sorted(pairs.items()):
        if set(pair) != {"indices", "values"}:
            missing = ({"indices", "values"} - set(pair)).pop()
            raise ValueError(f"sparse delta for {stem!r} has no {stem}.{missing}; indices and values come in pairs")
        if stem not in own:
            if strict:
                raise ValueError(
                    f"the sparse delta has tensor {stem!r}, which {type(model).__name__} does not have: it was trained "
                    "on another model (or on a wrapper of this one); pass strict=False to skip such tensors"
                )
            continue
        weight, indices, values = own[stem], pair["indices"], pair["values"]
        _no_dtensor(weight, stem)
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or indices.dim() != 1:
            raise ValueError(f"{stem}.indices must be a 1-D int64 tensor, got {getattr(indices, 'dtype', indices)!r}")
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 1:
            raise ValueError(f"{stem}.values must be a 1-D floating tensor, got {getattr(values, 'dtype', values)!r}")
        if values.numel() != indices.numel():
            raise ValueError(f"{stem}: {indices.numel()} indices but {values.numel()} values; they must match")
        if indices.numel():
            if not bool((indices[1:] > indices[:-1]).all()):
                raise ValueError(f"{stem}.indices must be strictly increasing (sorted, no repeats)")
            if int(indices[0]) < 0 or int(indices[-1]) >= weight.numel():
                raise ValueError(
                    f"{stem}.indices must be in [0, {weight.numel()}) (shape {tuple(weight.shape)}), "
                    f"got {int(indices[0])}..{int(indices[-1])}"
                )
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{stem}.values has NaN or infinite entries")
        if not weight.is_contiguous():
            raise ValueError(f"{stem} is not contiguous; sparse deltas index the flat storage of a weight")
        todo.append((stem, weight, indices, values))
    with torch.no_grad():
        for _, param, indices, values in todo:
            idx = indices.to(param.device)
            flat = param.view(-1)
            flat.index_copy_(0, idx, (flat[idx].float() + values.to(param.device).float()).to(param.dtype))
    return sorted(stem for stem, *_ in todo)
