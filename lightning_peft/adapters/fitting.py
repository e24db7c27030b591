"""Whether a saved adapter's tensors fit a model: one check for every adapter kind, before any weight is written."""

from __future__ import annotations

import torch

__all__ = ["AdapterMismatchError", "check_fits"]


class AdapterMismatchError(ValueError):
    """The adapter's tensors do not fit the model (another model, another rank, other targets)."""


def check_fits(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], kind: str, why: str, strict: bool = True
) -> None:
    """Refuse ``tensors`` unless each has a place of its shape in ``expected`` (and, ``strict``, every place is filled).

    Args:
        tensors: the adapter's tensors, by name.
        expected: the model's tensors they would be copied into, by the same names.
        kind: the adapter's kind for the messages (``"LoRA"``, ``"SSF"``).
        why: what a shape mismatch means, ending the message (``"another model"``).
        strict: also refuse an adapter that lacks some of ``expected``.

    Raises:
        AdapterMismatchError: the first misfit, named.

    Example:
        >>> try:
        ...     check_fits({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, "LoRA", "another model")
        ... except AdapterMismatchError as err:
        ...     print(err)
        tensor 'a' has shape (2,) in the LoRA adapter but (3,) in the model: the adapter was trained on another model
    """
    for key, value in tensors.items():
        if key not in expected:
            raise AdapterMismatchError(f"the {kind} adapter has tensor {key!r}, which the model has no place for")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterMismatchError(
                f"tensor {key!r} has shape {tuple(value.shape)} in the {kind} adapter but "
                f"{tuple(expected[key].shape)} in the model: the adapter was trained on {why}"
            )
    lacking = [k for k in expected if k not in tensors] if strict else []
    if lacking:
        raise AdapterMismatchError(
            f"the {kind} adapter lacks {len(lacking)} tensor(s) the model has, first {lacking[0]!r}"
        )
