"""Putting sparse layers into a model and taking them out, finding them, and resetting freed slots' optimizer state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lightning_peft import distributed
from lightning_peft.adapters.sparse.bank import SparseDeltaBank
from lightning_peft.adapters.sparse.layer import SparseDeltaLayer, _check_params
from lightning_peft.adapters.sparse.shards import BANK_NAME


# ------------------------------------------------------------------------------------------------ model level
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _walk(module: nn.Module, path: str, clean: str) -> Iterator[tuple[str, str, nn.Module]]:
    yield path, clean, module
    for child_name, child in module._modules.items():
        if child is None:
            continue
        child_path = f"{path}.{child_name}" if path else child_name
        if isinstance(module, SparseDeltaLayer) and child_name == "base_layer":
            yield from _walk(child, child_path, clean)  # the wrapped module is the layer itself, by name
            continue
        yield from _walk(child, child_path, f"{clean}.{child_name}" if clean else child_name)


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLayer]]:
    """``(name, layer)`` of every :class:`SparseDeltaLayer`, named as in the model before injection, in model order."""
    for _, clean, module in _walk(model, "", ""):
        if isinstance(module, SparseDeltaLayer):
            yield clean, module


def _check_untied(model: nn.Module, checked: Mapping[str, tuple[str, ...]]) -> None:
    """A targeted tensor used under another name (tied embeddings) would get only part of its gradient."""
    users: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    for module_name, param_names in checked.items():
        for pname in param_names:
            full = f"{module_name}.{pname}"
            names = users.get(id(model.get_submodule(module_name)._parameters[pname]), [full])
            if len(names) > 1:
                others = [n for n in names if n != full]
                raise ValueError(
                    f"inject_sparse: {full} is tied to {others}; a sparse delta on a shared tensor would see only the "
                    "gradient through one of its users: leave it out of the targets"
                )


def sparse_bank(model: nn.Module) -> SparseDeltaBank | None:
    """The model's :class:`SparseDeltaBank` (its ``values`` is the parameter to optimise), or None."""
    for module in model.modules():
        if isinstance(module, SparseDeltaBank):
            return module
    return None


def inject_sparse(
    model: nn.Module, targets: Mapping[str, tuple[str, ...]], capacity: int, dtype: torch.dtype = torch.float32
) -> SparseDeltaBank:
    """Wrap the named modules in :class:`SparseDeltaLayer`, with one shared bank; all or nothing.

    Every check runs before the model is touched, so an error leaves it unchanged. The parameters of the
    wrapped modules (their own, not their children's) are frozen; other parameters are left as they are. No
    entry is selected yet: call :meth:`SparseDeltaLayer.add`. The bank is registered as ``sparse_delta_bank``
    in the first wrapped layer in model order (so its parameter is in ``model.parameters()`` for the optimizer
    and DDP, and in ``state_dict``) and referenced by the others.

    Args:
        model: the root module (names are relative to it).
        targets: ``{module name: parameter names}``, e.g. ``{"blocks.0.attn.qkv": ("weight",)}``.
        capacity: number of bank slots (the most entries trained at once).
        dtype: dtype of the bank (float32 is the norm, whatever the weights' dtype).

    Returns:
        The bank; its ``values`` is the one parameter to optimise.

    Raises:
        ValueError: no targets, an unknown module or parameter, a model that already has sparse deltas,
            a capacity that is not a positive integer, or weights on several devices.
        NotImplementedError: a weight is already a DTensor (inject before sharding).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> bank = inject_sparse(net, {"0": ("weight",), "1": ("weight", "bias")}, capacity=10)
        >>> [name for name, _ in sparse_layers(net)], sparse_bank(net) is bank, len(net)
        (['0', '1'], True, 2)
    """
    if sparse_bank(model) is not None or any(True for _ in sparse_layers(model)):
        raise ValueError(f"{type(model).__name__} already has sparse deltas; call remove_sparse() before injecting")
    if not targets:
        raise ValueError("inject_sparse needs at least one target, e.g. {'blocks.0.attn.qkv': ('weight',)}")
    SparseDeltaBank(capacity, dtype, device="meta")  # validates capacity and dtype without allocating
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    checked: dict[str, tuple[str, ...]] = {}
    devices: set[torch.device] = set()
    for name, param_names in targets.items():
        if not name or name not in modules:
            leaf = name.rsplit(".", 1)[-1] if name else ""
            near = [n for n in modules if n and (n.endswith("." + leaf) or n == leaf)][:10]
            tops = [n for n, _ in model.named_children()][:20]
            hint = f"modules ending in {leaf!r}: {near}" if near else f"top-level modules: {tops}"
            raise ValueError(f"inject_sparse: {type(model).__name__} has no module {name!r}; {hint}")
        checked[name] = _check_params(modules[name], param_names, name)
        devices.update(modules[name]._parameters[p].device for p in checked[name])  # type: ignore[union-attr]
    if len(devices) > 1:
        raise ValueError(f"inject_sparse: the target weights are on several devices {sorted(map(str, devices))}")
    _check_untied(model, checked)
    bank = SparseDeltaBank(capacity, dtype, device=devices.pop())
    distributed.mark_replicated([bank.values])  # FSDP2 (lightning_peft.shard) keeps the bank whole on every rank
    layers = {name: SparseDeltaLayer(modules[name], checked[name], bank) for name in checked}
    for name in sorted(layers, key=lambda n: n.count("."), reverse=True):  # deepest first: parents' paths stay valid
        _set_submodule(model, name, layers[name])
    layers[min(layers, key=order.__getitem__)].add_module(BANK_NAME, bank)
    return bank


def remove_sparse(model: nn.Module, merge: bool = True) -> list[str]:
    """Unwrap every :class:`SparseDeltaLayer` (which drops the bank with them).

    Args:
        model: the root module.
        merge: keep the learned values in the weights (True) or restore the pretrained ones (False).

    Returns:
        The names of the unwrapped modules. Their parameters get back the ``requires_grad`` they had at injection.
    """
    found = [(path, clean, m) for path, clean, m in _walk(model, "", "") if isinstance(m, SparseDeltaLayer)]
    for path, _, layer in reversed(found):  # children before parents, so every path is still valid
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        for pname, param in layer.base_layer.named_parameters(recurse=False):
            param.requires_grad_(layer._requires_grad.get(pname, param.requires_grad))
        layer._modules.pop(BANK_NAME, None)
        if path:
            _set_submodule(model, path, layer.base_layer)
    return [clean for _, clean, _ in found]


# ------------------------------------------------------------------------------------------------ optimizer
@torch.no_grad()
def reset_optimizer_slots(optimizer: torch.optim.Optimizer, param: torch.Tensor, slots: torch.Tensor) -> list[str]:
    """Zero every per-element state of ``param`` (Adam's ``exp_avg``, ``exp_avg_sq``, ...) at the flat ``slots``.

    Call it with the slots :meth:`SparseDeltaLayer.retire` returns, so a freed slot holds zero value and zero
    moments until an entry takes it. Scalar state (``step``) is shared and left alone.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (for Lightning's wrapper, pass ``.optimizer``).
        param: the bank's ``values``.
        slots: flat positions into ``param``.

    Returns:
        The names of the state tensors that were reset (empty if the optimizer has no state for ``param`` yet).

    Example:
        >>> p = nn.Parameter(torch.zeros(4))
        >>> opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(4)
        >>> opt.step()
        >>> reset_optimizer_slots(opt, p, torch.tensor([1, 2]))
        ['exp_avg', 'exp_avg_sq']
        >>> opt.state[p]["exp_avg"].tolist()
        [0.10000000149011612, 0.0, 0.0, 0.10000000149011612]
    """
    state = optimizer.state.get(param)
    if not state:
        return []
    reset = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
            value.view(-1).index_fill_(0, torch.as_tensor(slots, dtype=torch.long, device=value.device), 0)
            reset.append(key)
    return reset
