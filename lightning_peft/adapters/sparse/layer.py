"""``SparseDeltaLayer`` and its autograd tap: a module whose selected parameters train a merged-in-place sparse delta.

One class with its gradient tap, forward, lazy merge, selection (``add`` / ``retire``) and checkpoint loading;
they share the layer's bookkeeping buffers, so the file is longer than the others of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_peft.adapters.sparse.bank import SparseDeltaBank
from lightning_peft.adapters.sparse.shards import (
    _FIELDS,
    _is_dtensor,
    _no_dtensor,
    _pack_when_sharded,
    _read_entries,
    _sample,
    _unpack,
    _write_entries,
)
from lightning_peft.adapters.targeting import is_conv1d

GradHook = Callable[["SparseDeltaLayer", str, torch.Tensor], None]


# ------------------------------------------------------------------------------------------------ tap
@torch.no_grad()
def _accumulate(values: torch.Tensor, slots: torch.Tensor, picked: torch.Tensor) -> None:
    """``values.grad[slots] += picked``, creating ``values.grad`` (zeros) on the first use after it was cleared."""
    if values.grad is None:
        values.grad = torch.zeros_like(values)
    if slots.numel():
        values.grad.index_add_(0, slots, picked.to(values.grad.dtype))


class _SparseTap(torch.autograd.Function):
    """Forward: ``W`` itself (a view). Backward: the dense gradient of ``W`` at the active positions, added into the
    bank's gradient.

    The bank's gradient is accumulated here, into ``values.grad`` directly (O(active entries) per layer), and not
    returned to autograd: autograd would build a bank-sized zero gradient for every layer and add them all up
    (measured: 202 layers x 1.78 M slots took 218 ms of a step, against 4 ms this way). ``values`` is an input only
    so that the tap's backward runs.
    """

    @staticmethod
    def forward(ctx, weight, values, positions, slots, layer, name):  # type: ignore[override]
        ctx.values, ctx.positions, ctx.slots, ctx.layer, ctx.name = values, positions, slots, layer, name
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.layer.grad_hook is not None:
            ctx.layer._hook_grad(ctx.name, grad)
        _accumulate(ctx.values, ctx.slots, grad.reshape(-1).index_select(0, ctx.positions))
        return None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ layer
def _check_params(module: nn.Module, param_names: tuple[str, ...] | list[str], where: str) -> tuple[str, ...]:
    if isinstance(param_names, str) or not param_names:
        raise ValueError(f"{where}: give a non-empty tuple of parameter names, e.g. ('weight',), got {param_names!r}")
    names = tuple(param_names)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: parameter names repeat: {names}")
    if isinstance(module, SparseDeltaLayer):
        raise ValueError(f"{where} already has a sparse delta; remove_sparse() before injecting again")
    own = [n for n, p in module._parameters.items() if p is not None]
    for name in names:
        param = module._parameters.get(name)
        if param is None:
            raise ValueError(
                f"{where} ({type(module).__name__}) has no parameter {name!r} of its own; it has: {own or 'none'}"
            )
        _no_dtensor(param, f"{where}.{name}")
        if not param.is_floating_point():
            raise ValueError(f"{where}.{name} is {param.dtype}; only floating tensors can take a sparse delta")
        if not param.is_contiguous():
            raise ValueError(f"{where}.{name} is not contiguous; sparse deltas index the flat storage of a weight")
    return names


def _index_dtype(size: int) -> torch.dtype:
    """int32 for positions into (or slots of) a tensor small enough, else int64: 4 bytes per entry saved."""
    return torch.int32 if size <= torch.iinfo(torch.int32).max else torch.long


def _fast_kind(module: nn.Module) -> str | None:
    cls = type(module)
    if cls is nn.Linear:
        return "linear"
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    if is_conv1d(module):
        return "conv1d"
    return None


class SparseDeltaLayer(nn.Module):
    """A module whose selected parameters train a sparse, merged-in-place delta held in a shared bank.

    The wrapped module keeps its parameters (frozen) under ``base_layer``. Entries join with
    :meth:`add` and leave with :meth:`retire`; what they learned stays in the weight.

    Args:
        base_layer: the module to adapt (any module; ``nn.Linear``, ``nn.Conv*d`` and transformers ``Conv1D``
            use a direct forward, others go through ``torch.func.functional_call``).
        param_names: the module's own parameters that take a delta, e.g. ``("weight",)``.
        bank: the model's :class:`SparseDeltaBank` (referenced, not registered; :func:`inject_sparse` registers it
            once, in the first layer).

    Attributes:
        grad_hook: ``hook(layer, param_name, dense_grad)`` called in backward with the dense gradient of each
            selected tensor (for scoring entries that are not selected yet; the tensor is transient, do not keep
            it). While set, a layer with no active entries still routes its weights through the tap. None: off.
            Under DDP the gradient is this rank's and this micro-batch's, before any all-reduce. A layer called
            several times in one forward (a training step that runs the model twice, shared blocks) gets one call
            with the sum over its uses: the partial gradients are added up (a dense copy of that tensor only) until
            the last use's arrives; :meth:`flush_grad_hook` delivers what is left of uses that never got a backward.
        merged: whether the weights hold the learned values (:meth:`unmerge` restores the pretrained ones).

    Raises:
        ValueError: a name is not a floating, contiguous parameter of ``base_layer`` itself.
        NotImplementedError: a weight is already a DTensor (inject before sharding).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> bank = SparseDeltaBank(4)
        >>> layer = SparseDeltaLayer(nn.Linear(3, 2), ("weight",), bank)
        >>> layer.add("weight", torch.tensor([1, 4]))
        tensor([0, 1])
        >>> with torch.no_grad():
        ...     _ = bank.values.copy_(torch.tensor([0.5, -0.5, 0.0, 0.0]))
        >>> idx, delta = layer.delta("weight")
        >>> idx.tolist(), delta.tolist()
        ([1, 4], [0.5, -0.5])
    """

    grad_hook: GradHook | None
    #: the bookkeeping buffers are decided identically on every rank: data-parallel strategies need not broadcast them
    buffers_in_sync = True

    def __init__(self, base_layer: nn.Module, param_names: tuple[str, ...] | list[str], bank: SparseDeltaBank) -> None:
        names = _check_params(base_layer, param_names, type(base_layer).__name__)
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_bank", bank)  # not a submodule here: the bank is registered once per model
        self.param_names = names
        self.grad_hook = None
        self._uses: dict[str, int] = {}  # taps applied while grad_hook is set whose backward has not come yet
        self._partial: dict[str, torch.Tensor] = {}  # the gradient summed over the uses that have come
        self.merged = True
        self._fast = _fast_kind(base_layer)
        self._synced_version: int | None = None
        self._loaded = False  # a state_dict was loaded since the last forward
        self._shards: dict[str, torch.Tensor] = {}  # FSDP2: the sharded parameter of each name, once seen
        self._requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters(recurse=False)}
        self._register_state_dict_hook(_pack_when_sharded)
        for param in base_layer.parameters(recurse=False):
            param.requires_grad_(False)
        self._all_active: dict[str, bool] = {}
        for name in names:
            weight = self._weight(name)
            device = weight.device
            positions = torch.empty(0, dtype=_index_dtype(weight.numel()), device=device)
            slots = torch.empty(0, dtype=_index_dtype(bank.capacity), device=device)
            base = torch.empty(0, dtype=weight.dtype, device=device)
            self.register_buffer(f"sparse_{name}_indices", positions)
            self.register_buffer(f"sparse_{name}_base", base)
            self.register_buffer(f"sparse_{name}_frozen", torch.empty(0, dtype=torch.float32, device=device))
            self.register_buffer(f"sparse_{name}_slots", slots)
            self.register_buffer(f"sparse_{name}_active_indices", positions.clone(), persistent=False)
            self.register_buffer(f"sparse_{name}_active_slots", slots.clone(), persistent=False)
            self.register_buffer(f"sparse_{name}_active_base", base.clone(), persistent=False)
            self._all_active[name] = True

    # ------------------------------------------------------------------------------------- access
    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped module (``in_channels``, ``weight``, ``num_embeddings``).

        Model code often reads them from its submodules; the weights it gets hold the learned (merged) values.
        """
        try:
            return super().__getattr__(name)
        except AttributeError as err:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer" or not hasattr(base, name):
                raise err from None
            return getattr(base, name)

    @property
    def bank(self) -> SparseDeltaBank:
        """The shared bank of delta values."""
        return self._bank  # type: ignore[return-value]

    def _weight(self, name: str) -> torch.Tensor:
        weight = self.base_layer._parameters[name]
        if weight is not None and _is_dtensor(weight):
            self._shards[name] = weight
        return weight  # type: ignore[return-value]

    def track_shards(self) -> bool:
        """Remember the sharded (FSDP2) parameters; returns whether there are any.

        Call it once sharding is done and outside forward/backward (:class:`SparseMethod` does, in
        ``on_fit_start``). FSDP2 puts its all-gathered, unsharded tensor on the module during forward and
        backward and frees it afterwards, so a write made then (the lazy sync in :meth:`forward`) goes into that
        tensor, for this pass, and into this rank's shard, which is what every later all-gather reads.
        """
        for name in self.param_names:
            self._weight(name)
        return bool(self._shards)

    @torch.no_grad()
    def _write(self, name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` at flat ``positions`` of ``name``: the tensor on the module and, under FSDP2, this rank's
        shard (each cast to its own dtype: with FSDP2 mixed precision the unsharded tensor has the compute dtype)."""
        weight = self._weight(name)
        _write_entries(weight, positions, values.to(weight.dtype))
        sharded = self._shards.get(name)
        if sharded is not None and sharded is not weight:  # FSDP2 has the unsharded tensor on the module now
            _write_entries(sharded, positions, values.to(sharded.dtype))

    @torch.no_grad()
    def _read(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """The weight's current values at flat ``positions`` (under FSDP2 gathered from their owners)."""
        return _read_entries(self._weight(name), positions)

    def _buf(self, name: str, field: str) -> torch.Tensor:
        return self._buffers[f"sparse_{name}_{field}"]  # type: ignore[return-value]

    def _set(self, name: str, field: str, value: torch.Tensor) -> None:
        self._buffers[f"sparse_{name}_{field}"] = value

    def _check_name(self, name: str) -> None:
        if name not in self.param_names:
            raise ValueError(f"{name!r} takes no sparse delta here; this layer's parameters are {self.param_names}")

    def indices(self, name: str) -> torch.Tensor:
        """Flat positions (int64) of every entry of ``name`` ever selected (active or retired), in insertion order.

        The layer keeps them as int32 where the tensor has fewer than 2**31 elements; this is an int64 copy.
        """
        self._check_name(name)
        return self._buf(name, "indices").long()

    def active_indices(self, name: str) -> torch.Tensor:
        """Flat positions (int64, a copy) of the active entries of ``name``."""
        self._check_name(name)
        return self._active(name, "indices").long()

    def active_slots(self, name: str) -> torch.Tensor:
        """Bank slots (int64, a copy) of the active entries of ``name`` (aligned with :meth:`active_indices`)."""
        self._check_name(name)
        return self._active(name, "slots").long()

    def active_count(self) -> int:
        """Number of active (trained) entries over all selected parameters."""
        return sum(self._active(n, "slots").numel() for n in self.param_names)

    def selected_count(self) -> int:
        """Number of entries ever selected (active or retired)."""
        return sum(self._buf(n, "indices").numel() for n in self.param_names)

    def density(self) -> float:
        """Active entries over the number of elements of the selected parameters."""
        return self.active_count() / sum(self._weight(n).numel() for n in self.param_names)

    # ------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.merged:
            return self.base_layer(*args, **kwargs)
        values = self.bank.values
        if self._loaded:  # a state_dict loaded: rebuild every selected entry (retired ones too) from the buffers
            self._loaded = False
            self.sync()
        elif values._version != self._synced_version:
            self._sync_active()
        if not (values.requires_grad and torch.is_grad_enabled()):
            return self.base_layer(*args, **kwargs)
        hook = self.grad_hook
        overrides: dict[str, torch.Tensor] = {}
        for name in self.param_names:
            slots = self._active(name, "slots")
            if not slots.numel() and hook is None:
                continue  # no entry (yet): with a hook the tap still runs, so that backward (and the hook) do
            positions = self._active(name, "indices")
            overrides[name] = _SparseTap.apply(self._weight(name), values, positions, slots, self, name)
            if hook is not None:
                self._uses[name] = self._uses.get(name, 0) + 1
        if not overrides:
            return self.base_layer(*args, **kwargs)
        return self._call(overrides, args, kwargs)

    @torch.no_grad()
    def _hook_grad(self, name: str, grad: torch.Tensor) -> None:
        """One use's gradient of ``name`` arrived: call :attr:`grad_hook` with the sum once every use's has."""
        left = self._uses.get(name, 1) - 1
        partial = self._partial.pop(name, None)
        total = grad if partial is None else partial.add_(grad)
        if left > 0:
            self._uses[name] = left
            self._partial[name] = total if partial is not None else grad.detach().clone()
            return
        self._uses.pop(name, None)
        if self.grad_hook is not None:
            self.grad_hook(self, name, total)

    @torch.no_grad()
    def flush_grad_hook(self) -> None:
        """Call :attr:`grad_hook` with the partial sums of uses whose backward never came, and forget the uses."""
        partial, self._partial, self._uses = self._partial, {}, {}
        if self.grad_hook is not None:
            for name, total in partial.items():
                self.grad_hook(self, name, total)

    def _call(self, overrides: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        base = self.base_layer
        hooked = bool(base._forward_hooks or base._forward_pre_hooks)
        if self._fast is not None and len(args) == 1 and not kwargs and not hooked:
            x = args[0]
            weight: torch.Tensor = overrides.get("weight", base._parameters["weight"])  # type: ignore[assignment]
            bias: torch.Tensor = overrides.get("bias", base._parameters.get("bias"))  # type: ignore[assignment]
            if self._fast == "linear":
                return F.linear(x, weight, bias)
            if self._fast == "conv":
                return base._conv_forward(x, weight, bias)  # type: ignore[operator]
            size_out = x.size()[:-1] + (weight.shape[-1],)  # transformers Conv1D: x @ W (in, out) + b
            return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)
        return functional_call(base, overrides, args, kwargs)

    # ------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def _sync_active(self) -> None:
        """Write ``base + bank value`` into the weight at the active entries (O(active))."""
        values = self.bank.values
        for name in self.param_names:
            positions = self._active(name, "indices")
            if positions.numel() == 0:
                continue
            eff = self._active(name, "base").float() + values.index_select(0, self._active(name, "slots"))
            self._write(name, positions, eff)
        self._synced_version = values._version

    @torch.no_grad()
    def _effective(self, name: str) -> torch.Tensor:
        """``frozen + bank value`` of every selected entry of ``name`` (float32, insertion order)."""
        frozen = self._buf(name, "frozen")
        slots = self._buf(name, "slots")
        delta = frozen.clone() if frozen.numel() else torch.zeros(slots.numel(), device=slots.device)
        active = slots >= 0
        if bool(active.any()):
            delta[active] += self.bank.values[slots[active]].float()
        return delta

    @torch.no_grad()
    def sync(self) -> None:
        """Rewrite every selected entry of the weights from ``base``, ``frozen`` and the bank. Idempotent.

        Under FSDP2 (weights sharded) each rank writes the entries of its own shards; no communication.
        """
        if not self.merged:
            return
        for name in self.param_names:
            indices = self._buf(name, "indices")
            if indices.numel():
                self._write(name, indices, self._buf(name, "base").float() + self._effective(name))
        self._synced_version = self.bank.values._version

    @torch.no_grad()
    def merge(self) -> None:
        """Make the weights hold the learned values again after :meth:`unmerge` (the normal state). Idempotent."""
        self.merged = True
        self.sync()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Write the pretrained values back into the weights; the layer then runs as the base module. Idempotent.

        While unmerged, the bank gets no gradient from this layer; :meth:`merge` restores the learned values.
        """
        for name in self.param_names:
            indices = self._buf(name, "indices")
            if indices.numel():
                self._write(name, indices, self._buf(name, "base"))
        self.merged = False
        self._synced_version = None

    # ------------------------------------------------------------------------------------- selection
    def _active(self, name: str, field: str) -> torch.Tensor:
        """``indices``, ``slots`` or ``base`` of the active entries of ``name`` (the buffers if none retired)."""
        return self._buf(name, field if self._all_active[name] else f"active_{field}")

    def _refresh(self, name: str) -> None:
        slots = self._buf(name, "slots")
        active = slots >= 0
        self._all_active[name] = bool(active.all())
        for field in ("indices", "slots", "base"):  # copies only while some entry is retired
            full = self._buf(name, field)
            self._set(name, f"active_{field}", full[:0] if self._all_active[name] else full[active])
        self._synced_version = None

    def _frozen(self, name: str) -> torch.Tensor:
        """The ``frozen`` buffer of ``name`` at full length: it is kept empty (all zero) until an entry retires."""
        frozen = self._buf(name, "frozen")
        if frozen.numel() != self._buf(name, "indices").numel():
            frozen = torch.zeros(self._buf(name, "indices").numel(), dtype=torch.float32, device=frozen.device)
            self._set(name, "frozen", frozen)
        return frozen

    def _locate(self, name: str, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(found, position in the buffers)`` of each flat index in ``wanted`` (position is junk where not found)."""
        indices = self._buf(name, "indices")
        if indices.numel() == 0:
            return torch.zeros_like(wanted, dtype=torch.bool), torch.zeros_like(wanted)
        ordered, order = indices.sort()
        at = torch.searchsorted(ordered, wanted.to(ordered.dtype)).clamp_(max=indices.numel() - 1)
        return ordered[at] == wanted, order[at]

    def _lookup(self, name: str, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(selected before, position in the buffers, active now)`` of each flat index (position junk where new)."""
        found, pos = self._locate(name, flat)
        active = found.clone()
        active[found] = self._buf(name, "slots")[pos[found]] >= 0
        return found, pos, active

    def _validate(self, name: str, flat: torch.Tensor, what: str) -> torch.Tensor:
        self._check_name(name)
        weight = self._weight(name)
        if not isinstance(flat, torch.Tensor) or flat.dtype != torch.long or flat.dim() != 1:
            got = f"{flat.dtype}, shape {tuple(flat.shape)}" if isinstance(flat, torch.Tensor) else type(flat).__name__
            raise ValueError(f"{what}: indices must be a 1-D int64 tensor of flat positions, got {got}")
        flat = flat.to(weight.device)
        if flat.numel():
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= weight.numel():
                raise ValueError(
                    f"{what}: flat indices must be in [0, {weight.numel()}) for {name} of shape "
                    f"{tuple(weight.shape)}, got values from {low} to {high}"
                )
            increasing = flat.numel() < 2 or bool((flat[1:] > flat[:-1]).all())  # sorted input needs no sort
            if not increasing and flat.unique().numel() != flat.numel():
                raise ValueError(f"{what}: indices repeat; pass each flat position once")
        return flat

    @torch.no_grad()
    def add(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Start training the entries at ``indices`` (flat positions into parameter ``name``).

        A new entry gets a bank slot with value 0 and remembers the weight's current (pretrained) value as its
        base. An entry that was retired resumes from what it had learned: its frozen delta moves into the slot.
        Nothing changes if an error is raised.

        Args:
            name: a parameter of this layer's ``param_names``.
            indices: 1-D int64 flat positions, unique, none of them active.

        Returns:
            The bank slots of the entries, in the order of ``indices``.

        Raises:
            ValueError: bad indices (type, range, repeats, already active), an unknown name, or a full bank.

        Under FSDP2 the pretrained values of new entries come from the ranks that hold them (a collective: call
        it on every rank with the same indices).
        """
        what = f"add({name!r})"
        flat = self._validate(name, indices, what)
        if flat.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=flat.device)
        found, pos, already = self._lookup(name, flat)
        slots_buf = self._buf(name, "slots")
        if bool(already.any()):
            raise ValueError(f"{what}: {int(already.sum())} entries are already active, e.g. {_sample(flat[already])}")
        slots = self.bank.allocate(flat.numel())  # raises, changing nothing, when the bank is full
        values = self.bank.values
        weight = self._weight(name)
        # re-activated entries: their learned delta moves from `frozen` into the bank; W already holds it
        old_pos = pos[found]
        if old_pos.numel():
            frozen = self._frozen(name)
            values.index_copy_(0, slots[found], frozen[old_pos].to(values.dtype))
            frozen[old_pos] = 0.0
            slots_buf[old_pos] = slots[found].to(slots_buf.dtype)
        new = ~found
        if bool(new.any()):
            fresh = flat[new]
            indices = self._buf(name, "indices")
            self._set(name, "indices", torch.cat([indices, fresh.to(indices.dtype)]))
            self._set(name, "base", torch.cat([self._buf(name, "base"), self._read(name, fresh)]))
            frozen = self._buf(name, "frozen")
            if frozen.numel():  # kept empty (all zero) until some entry retires
                zeros = torch.zeros(fresh.numel(), dtype=torch.float32, device=weight.device)
                self._set(name, "frozen", torch.cat([frozen, zeros]))
            self._set(name, "slots", torch.cat([slots_buf, slots[new].to(slots_buf.dtype)]))
        self._refresh(name)
        return slots

    @torch.no_grad()
    def retire(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Stop training the entries at ``indices``; what they learned stays in the weight and in :meth:`delta`.

        Args:
            name: a parameter of this layer's ``param_names``.
            indices: 1-D int64 flat positions of active entries.

        Returns:
            The freed bank slots: pass them to :func:`reset_optimizer_slots` so their optimizer state is cleared.

        Raises:
            ValueError: bad indices or entries that are not active.
        """
        what = f"retire({name!r})"
        flat = self._validate(name, indices, what)
        if flat.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=flat.device)
        _, pos, active = self._lookup(name, flat)
        slots_buf = self._buf(name, "slots")
        inactive = ~active
        if bool(inactive.any()):
            raise ValueError(f"{what}: {int(inactive.sum())} entries are not active, e.g. {_sample(flat[inactive])}")
        slots = slots_buf[pos].long()
        frozen = self._frozen(name)
        frozen[pos] = self.bank.values[slots].float()
        slots_buf[pos] = -1
        if self.merged:  # the weight may not have seen the last optimizer step yet
            self._write(name, flat, self._buf(name, "base")[pos].float() + frozen[pos])
        self.bank.release(slots)
        self._refresh(name)
        return slots

    @torch.no_grad()
    def delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, values)``: every entry of ``name`` ever selected and its learned delta from the pretrained value.

        Indices are int64 and sorted; values are float32 (``frozen + bank value``).
        """
        self._check_name(name)
        indices = self._buf(name, "indices")
        order = indices.argsort()
        return indices[order].long(), self._effective(name)[order]

    # ------------------------------------------------------------------------------------- checkpoint
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The selection grows during training, so a checkpoint's buffers are larger than a fresh layer's: take the
        # incoming shapes before the copy. The weight loads with the base layer (it holds merged values already).
        for name in self.param_names:
            for field in _FIELDS:
                key = f"{prefix}sparse_{name}_{field}"
                incoming = state_dict.get(key)
                if isinstance(incoming, bytes):  # from a distributed checkpoint (see _pack_when_sharded)
                    incoming = state_dict[key] = _unpack(incoming)
                own = self._buf(name, field)
                if isinstance(incoming, torch.Tensor) and incoming.shape != own.shape:
                    self._set(name, field, torch.empty(incoming.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        for name in self.param_names:
            self._refresh(name)
        # The next forward (the bank has loaded by then) rewrites every selected entry: a checkpoint that left the
        # frozen weights out (AdapterCheckpoints) loads pretrained values into them, retired entries included.
        self._loaded = True

    def extra_repr(self) -> str:
        parts = [
            f"{n}: {self._active(n, 'slots').numel()} active / {self._buf(n, 'indices').numel()} selected"
            for n in self.param_names
        ]
        return ", ".join(parts) + f", merged={self.merged}"
