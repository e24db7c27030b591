"""The sparse layer's entries: which flat positions of each tensor train, in which bank slot, from which base value.

:class:`SparseEntries` is the selection half of :class:`~.layer.SparseDeltaLayer`: the bookkeeping buffers
(``sparse_<p>_indices`` / ``_base`` / ``_frozen`` / ``_slots`` and the active views of them), the queries on them,
and the two moves, :meth:`SparseEntries.add` (an entry starts training, or resumes what it learned) and
:meth:`SparseEntries.retire` (it stops; what it learned stays in the weight and in ``frozen``). The layer supplies
the weight access (``_weight``, ``_read``, ``_write``: FSDP2-aware) and the bank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_peft.adapters.sparse.shards import _sample

if TYPE_CHECKING:
    from lightning_peft.adapters.sparse.bank import SparseDeltaBank


def _index_dtype(size: int) -> torch.dtype:
    """int32 for positions into (or slots of) a tensor small enough, else int64: 4 bytes per entry saved."""
    return torch.int32 if size <= torch.iinfo(torch.int32).max else torch.long


class SparseEntries:
    """Mixin of :class:`~.layer.SparseDeltaLayer` (an ``nn.Module``): the entries of its selected tensors."""

    param_names: tuple[str, ...]
    merged: bool
    _buffers: dict[str, torch.Tensor | None]
    _all_active: dict[str, bool]
    _synced_version: int | None

    if TYPE_CHECKING:

        @property
        def bank(self) -> SparseDeltaBank: ...

        def _weight(self, name: str) -> torch.Tensor: ...

        def _read(self, name: str, positions: torch.Tensor) -> torch.Tensor: ...

        def _write(self, name: str, positions: torch.Tensor, values: torch.Tensor) -> None: ...

        def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None: ...

    def _register_entries(self, name: str, capacity: int) -> None:
        """The empty bookkeeping buffers of parameter ``name`` (positions and slots int32 where they fit)."""
        weight = self._weight(name)
        device = weight.device
        positions = torch.empty(0, dtype=_index_dtype(weight.numel()), device=device)
        slots = torch.empty(0, dtype=_index_dtype(capacity), device=device)
        base = torch.empty(0, dtype=weight.dtype, device=device)
        self.register_buffer(f"sparse_{name}_indices", positions)
        self.register_buffer(f"sparse_{name}_base", base)
        self.register_buffer(f"sparse_{name}_frozen", torch.empty(0, dtype=torch.float32, device=device))
        self.register_buffer(f"sparse_{name}_slots", slots)
        self.register_buffer(f"sparse_{name}_active_indices", positions.clone(), persistent=False)
        self.register_buffer(f"sparse_{name}_active_slots", slots.clone(), persistent=False)
        self.register_buffer(f"sparse_{name}_active_base", base.clone(), persistent=False)
        self._all_active[name] = True

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

    #: what each move needs of its entries, and what the others are called in its error
    _MOVES = {"add": ("inactive", "already active"), "retire": ("active", "not active"), "forget": ("retired", "")}

    def _entries_to_move(
        self, name: str, indices: torch.Tensor, move: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(flat, selected before, position in the buffers)`` of the entries ``add``/``retire``/``forget`` moves.

        Raises the ``ValueError`` of bad indices, or of entries not in the state the move needs (``add``: not active;
        ``retire``: active; ``forget``: selected once and retired), before anything changes. ``flat`` is int64 on the
        weight's device (empty: nothing to do).
        """
        what = f"{move}({name!r})"
        flat = self._validate(name, indices, what)
        if flat.numel() == 0:
            return flat, flat.bool(), flat
        found, pos, now = self._lookup(name, flat)
        needs, others = self._MOVES[move]
        wrong = {"inactive": now, "active": ~now, "retired": now | ~found}[needs]
        if bool(wrong.any()):
            state = others or f"not retired entries of {name} (active, or never selected)"
            raise ValueError(f"{what}: {int(wrong.sum())} entries are {state}, e.g. {_sample(flat[wrong])}")
        return flat, found, pos

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
        flat, found, pos = self._entries_to_move(name, indices, "add")
        if flat.numel() == 0:
            return flat
        slots_buf = self._buf(name, "slots")
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
        flat, _, pos = self._entries_to_move(name, indices, "retire")
        if flat.numel() == 0:
            return flat
        slots_buf = self._buf(name, "slots")
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
    def forget(self, name: str, indices: torch.Tensor) -> None:
        """Drop retired entries from the bookkeeping: their weights go back to the pretrained value.

        What they learned is discarded (a method that sends an entry back to its base, as SpIEL's drop does), and
        their positions, base values and frozen deltas leave the buffers, so the bookkeeping holds only entries that
        still matter. Added again later, an entry starts afresh from the pretrained value. Nothing changes if an
        error is raised. Under FSDP2 each rank writes its own shards (call it on every rank with the same indices).

        Args:
            name: a parameter of this layer's ``param_names``.
            indices: 1-D int64 flat positions of retired entries.

        Raises:
            ValueError: bad indices, or entries that are active or were never selected.
        """
        flat, _, pos = self._entries_to_move(name, indices, "forget")
        if flat.numel() == 0:
            return
        if self.merged:  # the weight holds base + frozen at retired entries
            self._write(name, flat, self._buf(name, "base")[pos].float())
        keep = torch.ones(self._buf(name, "indices").numel(), dtype=torch.bool, device=flat.device)
        keep[pos] = False
        for field in ("indices", "base", "slots"):
            self._set(name, field, self._buf(name, field)[keep])
        frozen = self._buf(name, "frozen")
        if frozen.numel():  # back to empty (all zero) once no entry left has a frozen delta
            frozen = frozen[keep]
            self._set(name, "frozen", frozen if bool(frozen.any()) else frozen[:0])
        self._refresh(name)

    @torch.no_grad()
    def delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, values)``: every entry of ``name`` ever selected and its learned delta from the pretrained value.

        Indices are int64 and sorted; values are float32 (``frozen + bank value``).
        """
        self._check_name(name)
        indices = self._buf(name, "indices")
        order = indices.argsort()
        return indices[order].long(), self._effective(name)[order]
