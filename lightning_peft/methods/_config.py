"""One rule the method cores share: a checkpoint made with another configuration is refused by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def refuse_changed(
    mine: Mapping[str, Any], saved: Mapping[str, Any], what: str, keys: Iterable[str] | None = None
) -> None:
    """Raise unless every configuration field in ``saved`` equals ours (fields missing from ``saved`` pass).

    Raises:
        ValueError: ``the checkpoint's <what> was configured differently (<field>: checkpoint x vs now y, ...)``.
    """
    fields = list(keys) if keys is not None else list(mine)
    differs = [k for k in fields if k in saved and saved[k] != mine[k]]
    if differs:
        detail = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {mine[k]!r}" for k in differs)
        raise ValueError(f"the checkpoint's {what} was configured differently ({detail})")
