"""The sparse core's shared names and its FSDP2 helpers: which rank holds an entry, reading and writing entries of a
(possibly sharded) weight, and the safetensors packing of the growing buffers for distributed checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft import distributed

BANK_NAME = "sparse_delta_bank"
"""Name of the bank's submodule in the first sparse layer (its parameter is ``<layer>.sparse_delta_bank.values``)."""

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
    from lightning_peft.adapters.sparse.layer import SparseDeltaLayer

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
