"""``SparseDeltaLayer``: a module whose selected parameters train a merged-in-place sparse delta.

The layer in three parts: its entries (:mod:`.entries`: buffers, ``add`` / ``retire``), its gradient path
(:mod:`.tap`: the autograd tap and the grad hook's sum over uses), and here what joins them to the wrapped
module: weight access (FSDP2-aware), forward, the lazy merge and checkpoint loading.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_peft.adapters.sparse.bank import SparseDeltaBank
from lightning_peft.adapters.sparse.entries import SparseEntries
from lightning_peft.adapters.sparse.shards import (
    _FIELDS,
    _is_dtensor,
    _no_dtensor,
    _pack_when_sharded,
    _read_entries,
    _unpack,
    _write_entries,
)
from lightning_peft.adapters.sparse.tap import GradHook, GradHookSum, _SparseTap
from lightning_peft.adapters.targeting import is_conv1d

__all__ = ["GradHook", "SparseDeltaLayer"]


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


def _fast_kind(module: nn.Module) -> str | None:
    cls = type(module)
    if cls is nn.Linear:
        return "linear"
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    if is_conv1d(module):
        return "conv1d"
    return None


class SparseDeltaLayer(SparseEntries, GradHookSum, nn.Module):
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
            self._register_entries(name, bank.capacity)

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
