"""Sparse weight deltas: train selected scalar entries of frozen weights with O(k) gradients and optimizer state.

The shared core of the selective methods (ID³, SaRA). ``k`` scalar entries of some base tensors are
trained; everything else stays frozen. Three objects carry it:

* :class:`SparseDeltaBank` holds **one** flat trainable ``nn.Parameter`` ``values`` of a fixed
  ``capacity`` (the budget) and the bookkeeping of which slots are in use. Its identity and size never
  change, so the optimizer and the DistributedDataParallel wrapper, built once, keep working while the
  selection grows or changes. It is registered once, as ``sparse_delta_bank`` inside the first wrapped
  layer (in model order), and referenced by the others: registering it on the model root would make it
  a member of a root ``nn.Sequential`` / ``nn.ModuleList`` (iterated by their ``forward``, counted by
  ``len``, returned by ``net[-1]``). :func:`sparse_bank` finds it.
* :class:`SparseDeltaLayer` wraps a module (``nn.Linear``, ``nn.Conv2d``, transformers ``Conv1D``,
  ``LayerNorm``, ``Embedding``, ...) whose selected parameters stay frozen under ``base_layer.``. For
  every selected parameter ``p`` it keeps, as checkpointed buffers, the flat positions of the chosen
  entries (``sparse_<p>_indices``), their pretrained values (``sparse_<p>_base``), the learned delta
  of entries that left the active set (``sparse_<p>_frozen``) and the bank slot of active entries
  (``sparse_<p>_slots``, -1 for retired ones).
* :func:`inject_sparse` / :func:`remove_sparse` put the layers into a model and take them out.

**Merged in place.** The base tensor itself holds the effective value,
``W.view(-1)[indices] == base + frozen + values[slots]`` (cast to ``W``'s dtype, always computed from
``base``, so rounding never accumulates). A forward therefore costs the base module's forward; no
dense copy of ``W`` is made. The merge is refreshed lazily: the forward compares the bank's in-place
version counter (bumped by every optimizer step) with the last one it synced and, if it moved,
rewrites the ``k`` active entries (O(k)).

**Gradient path.** In a forward that needs gradients each selected tensor goes through
``_SparseTap``: an autograd function whose forward returns ``W`` itself (a view, no copy) and whose
backward receives the transient dense gradient of ``W`` and adds ``grad.view(-1)[active positions]`` into
the bank's gradient at the entries' slots (``values.grad.index_add_``: O(active entries) per layer). So
the only ``.grad`` in the model is the bank's (``capacity`` floats); base weights keep ``grad=None``.
A layer with no active entries and no :attr:`SparseDeltaLayer.grad_hook` runs the base module as is.
The bank's gradient is written by the taps, not handed back to autograd (which would build a bank-sized
zero gradient per layer and sum them: 218 ms of a step for 202 layers x 1.78 M slots): hooks on
``values`` (``register_post_accumulate_grad_hook``, torch DDP's reducer) do not see it and
``torch.autograd.grad`` with respect to ``values`` gives nothing. The multi-process paths reduce it after
the backward (``ddp_selective``; FSDP2 keeps the bank replicated and averages its gradient).

**Bookkeeping** per selected entry: its flat position and its bank slot (int32 where the tensor has fewer than
2**31 elements and the bank fewer than 2**31 slots, else int64) and its pretrained value (the weight's dtype):
13 bytes per entry for float32 weights, counting the bank's ``in_use`` flag (it was 45 with int64 positions and
slots, a learned-delta buffer that is all zero until an entry retires, and copies of the active entries that are
the buffers themselves until one does; both are now made only when an entry retires). The value, its gradient
and two AdamW moments add 16.

**Optimizer state carries over by construction.** The bank parameter never changes, so the
optimizer is never rebuilt. An entry added at step ``t`` gets a slot whose moments are zero, under the
parameter's shared step counter: exactly what a dense AdamW with a gradient mask gives an entry that
was masked until ``t`` (its moments stayed zero, its update was zero). Growth thus needs no copying.
A slot that is freed (:meth:`SparseDeltaLayer.retire`) still has the moments of its old entry: reset
them with :func:`reset_optimizer_slots` right after retiring, so free slots keep zero value and zero
moments (an Adam update of a zero-moment slot is zero) and the next entry that gets the slot starts
clean. Weight decay acts on the bank, i.e. it pulls each delta towards the pretrained value.

**Saving.** :func:`sparse_state_dict` gives ``<module>.<param>.indices`` (int64, strictly increasing)
and ``<module>.<param>.values`` (float32 deltas from the pretrained values), the ``"sparse"`` format
of :mod:`lightning_peft.adapters.delta`; :func:`apply_sparse_delta` adds them onto a plain base model
after checking everything. A model ``state_dict`` (a training checkpoint) holds the grown buffers;
:meth:`SparseDeltaLayer._load_from_state_dict` resizes them, so a freshly injected model resumes it.

**FSDP2.** Inject into the unsharded model, then shard it (``lightning_peft.shard``): the bank's
``values`` is marked replicated (:func:`lightning_peft.distributed.mark_replicated`), so it stays whole on
every rank and its gradient is averaged by the caller; indices stay global flat positions into the full
tensor. In forward and backward FSDP2 puts its all-gathered (unsharded) weight on the module, so the tap
sees the whole dense gradient of this rank's batch. Writes of learned values go into the tensor on the
module *and* into this rank's shard (``DTensor._local_tensor``, FSDP2's all-gather input): the unsharded
tensor is freed after the pass, and a block resharded after forward is gathered again from the shards
for its backward. Reading the pretrained value of a new entry asks its owner (a sum all-reduce of O(new)
values). In a distributed checkpoint the grown buffers travel as safetensors bytes (a distributed
checkpoint loads into tensors of the current sizes and refuses any other).

Not supported: weights sharded before injection; sharding other than FSDP2's dim 0 on a 1-D mesh (tensor
parallelism); tied weights (:func:`inject_sparse` refuses a tensor used under two names).

Example:
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> bank = inject_sparse(net, {"0": ("weight",), "2": ("weight", "bias")}, capacity=8)
    >>> layer = dict(sparse_layers(net))["0"]
    >>> layer.add("weight", torch.tensor([0, 5, 9]))
    tensor([0, 1, 2])
    >>> opt = torch.optim.AdamW([bank.values], lr=0.1)
    >>> net(torch.randn(3, 4)).sum().backward()
    >>> [n for n, p in net.named_parameters() if p.grad is not None]
    ['0.sparse_delta_bank.values']
    >>> opt.step()
    >>> sorted(sparse_state_dict(net))
    ['0.weight.indices', '0.weight.values']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_peft import distributed
from lightning_peft.adapters.targeting import is_conv1d

__all__ = [
    "BANK_NAME",
    "SparseDeltaBank",
    "SparseDeltaLayer",
    "apply_sparse_delta",
    "inject_sparse",
    "remove_sparse",
    "reset_optimizer_slots",
    "sparse_bank",
    "sparse_layers",
    "sparse_state_dict",
]

BANK_NAME = "sparse_delta_bank"
"""Name of the bank's submodule in the first sparse layer (its parameter is ``<layer>.sparse_delta_bank.values``)."""

GradHook = Callable[["SparseDeltaLayer", str, torch.Tensor], None]

_FIELDS = ("indices", "base", "frozen", "slots")  # persistent, per selected parameter


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or hasattr(tensor, "full_tensor")


def _no_dtensor(tensor: torch.Tensor, where: str) -> None:
    if _is_dtensor(tensor):
        raise NotImplementedError(
            f"{where} is a DTensor (already sharded): inject sparse deltas into the unsharded model, then shard it "
            "(the ID3/SaRA callbacks inject in setup; shard with lightning_peft.shard from configure_model), and load "
            "a saved delta onto an unsharded model"
        )


# ------------------------------------------------------------------------------------------------ FSDP2 shards
def _shard_span(weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(flat local shard, first global flat position it holds, how many)`` of an FSDP2 parameter.

    FSDP2 shards dim 0 like ``torch.chunk``: rank ``r`` of ``R`` holds rows ``[r·c, min((r+1)·c, rows))`` with
    ``c = ceil(rows / R)``, as ``_local_tensor`` (a contiguous view of FSDP's padded all-gather input, so writes
    into it are what the next all-gather sends).
    """
    placements: tuple[Any, ...] = tuple(getattr(weight, "placements", ()))
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise NotImplementedError(
            f"sparse deltas support FSDP2's dim-0 sharding on a 1-D mesh only, got placements {tuple(placements)}"
        )
    mesh = weight.device_mesh  # type: ignore[attr-defined]
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = weight.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    local = weight._local_tensor  # type: ignore[attr-defined]
    held = max(0, min(chunk, rows - start))
    if local.shape[0] != held or not local.is_contiguous():
        raise NotImplementedError(
            f"unexpected FSDP2 shard layout: rows {rows}, rank {rank}/{world}, local {local.shape}"
        )
    per_row = weight.numel() // rows if rows else 0
    return local.view(-1), start * per_row, held * per_row


def _write_entries(weight: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """``weight.view(-1)[positions] = values``; for a DTensor, only the positions this rank's shard holds (local)."""
    positions = positions.long()  # index_copy_ takes int64 only (a transient copy of int32 bookkeeping)
    if not _is_dtensor(weight):
        weight.view(-1).index_copy_(0, positions, values)
        return
    flat, start, n = _shard_span(weight)
    mine = (positions >= start) & (positions < start + n)
    flat.index_copy_(0, positions[mine] - start, values[mine])


def _read_entries(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``weight.view(-1)[positions]``; for a DTensor, each owner's values summed across ranks (a collective)."""
    if not _is_dtensor(weight):
        return weight.view(-1)[positions]
    flat, start, n = _shard_span(weight)
    mine = (positions >= start) & (positions < start + n)
    out = torch.zeros(positions.numel(), dtype=flat.dtype, device=flat.device)
    out[mine] = flat[positions[mine] - start]
    return distributed.all_reduce(out, "sum")  # every entry has one owner; the others add zero (exact)


def _pack(tensor: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"t": tensor.detach().cpu().contiguous()})


def _unpack(blob: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(blob)["t"]


def _pack_when_sharded(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Under FSDP2, hand the growing bookkeeping buffers to a distributed checkpoint as safetensors bytes.

    A distributed checkpoint (DCP, what ``ModelParallelStrategy`` writes) loads
    *into* the tensors of the model's current ``state_dict``, and refuses a size that differs: a fresh model's
    buffers are empty, a trained one's hold every selected entry. Bytes load as a whole object instead;
    :meth:`SparseDeltaLayer._load_from_state_dict` turns them back into tensors. Unsharded models keep tensors.
    """
    assert isinstance(module, SparseDeltaLayer)
    if not module.track_shards():
        return
    for name in module.param_names:
        for field in _FIELDS:
            key = f"{prefix}sparse_{name}_{field}"
            if isinstance(state_dict.get(key), torch.Tensor):
                state_dict[key] = _pack(state_dict[key])


def _sample(tensor: torch.Tensor, n: int = 5) -> list[int]:
    return [int(v) for v in tensor[:n].tolist()]


# ------------------------------------------------------------------------------------------------ bank
class SparseDeltaBank(nn.Module):
    """One flat trainable tensor of fixed size holding every active sparse delta, and its free-slot bookkeeping.

    Args:
        capacity: number of slots (the largest number of entries trained at once), ``> 0``.
        dtype: floating dtype of ``values`` (float32 by default, whatever the weights' dtype).
        device: where ``values`` lives (the weights' device).

    Raises:
        ValueError: ``capacity`` is not a positive integer or ``dtype`` is not floating.

    Example:
        >>> bank = SparseDeltaBank(4)
        >>> bank.allocate(3)
        tensor([0, 1, 2])
        >>> bank.release(torch.tensor([1]))
        >>> bank.allocate(2), bank.used
        (tensor([1, 3]), 4)
    """

    in_use: torch.Tensor

    def __init__(
        self, capacity: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"the sparse budget (capacity) must be a positive integer, got {capacity!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"the sparse bank holds trainable values and needs a floating dtype, got {dtype}")
        self.capacity = capacity
        self.values = nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))
        self.register_buffer("in_use", torch.zeros(capacity, dtype=torch.bool, device=device))
        self._used = 0  # mirrors in_use.sum(), kept on the host
        self._low = 0  # every slot below it is in use

    @property
    def used(self) -> int:
        """Number of slots in use."""
        return self._used

    @property
    def free(self) -> int:
        """Number of free slots."""
        return self.capacity - self._used

    @torch.no_grad()
    def allocate(self, n: int) -> torch.Tensor:
        """Take the ``n`` lowest free slots; their values are zero.

        Raises:
            ValueError: fewer than ``n`` slots are free.
        """
        device = self.in_use.device
        if n <= 0:
            return torch.empty(0, dtype=torch.long, device=device)
        if n > self.free:
            raise ValueError(
                f"the sparse budget (capacity {self.capacity}) is full: {self._used} slots are in use and {n} more "
                "were asked for; retire entries first or inject with a larger capacity"
            )
        block = self.in_use[self._low : self._low + n]
        if block.numel() == n and not bool(block.any()):  # the common case: the free slots are a tail
            slots = torch.arange(self._low, self._low + n, device=device)
        else:
            slots = (~self.in_use[self._low :]).nonzero().squeeze(1)[:n] + self._low
        self.in_use[slots] = True
        self.values.index_fill_(0, slots, 0.0)
        self._used += n
        self._low = int(slots[-1]) + 1
        return slots

    @torch.no_grad()
    def release(self, slots: torch.Tensor) -> None:
        """Zero the values at ``slots`` and mark them free.

        Reset the optimizer's state at these slots too (:func:`reset_optimizer_slots`).

        Raises:
            ValueError: a slot is out of range, repeated, or not in use.
        """
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.in_use.device).reshape(-1)
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self.capacity:
            raise ValueError(f"slots must be in [0, {self.capacity}), got {_sample(slots)}...")
        if slots.unique().numel() != slots.numel() or not bool(self.in_use[slots].all()):
            raise ValueError("release() got a slot twice or a slot that is not in use")
        self.values.index_fill_(0, slots, 0.0)
        self.in_use[slots] = False
        self._used -= slots.numel()
        self._low = min(self._low, int(slots.min()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self._used = int(self.in_use.sum())
        free = (~self.in_use).nonzero()
        self._low = int(free[0]) if free.numel() else self.capacity

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, used={self._used}, dtype={self.values.dtype}"


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
        found, pos = self._locate(name, flat)
        slots_buf = self._buf(name, "slots")
        already = found.clone()
        already[found] = slots_buf[pos[found]] >= 0
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
        found, pos = self._locate(name, flat)
        slots_buf = self._buf(name, "slots")
        inactive = ~found
        inactive[found] = slots_buf[pos[found]] < 0
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
