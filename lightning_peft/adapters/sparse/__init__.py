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

import torch  # noqa: F401  (the examples above use it)

from lightning_peft.adapters.sparse.bank import SparseDeltaBank
from lightning_peft.adapters.sparse.layer import GradHook, SparseDeltaLayer
from lightning_peft.adapters.sparse.model import (
    inject_sparse,
    remove_sparse,
    reset_optimizer_slots,
    sparse_bank,
    sparse_layers,
)
from lightning_peft.adapters.sparse.saving import apply_sparse_delta, sparse_state_dict
from lightning_peft.adapters.sparse.shards import BANK_NAME
from lightning_peft.adapters.sparse.shards import _read_entries as _read_entries  # tests reach for them here
from lightning_peft.adapters.sparse.shards import _write_entries as _write_entries

__all__ = [
    "BANK_NAME",
    "GradHook",
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
