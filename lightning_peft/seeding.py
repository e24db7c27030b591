"""Random choices that every rank agrees on without talking: generators seeded from ``(seed, step)``.

A choice that must be the same on all ranks (LISA's layer set, SaRA's re-selection, the resumable sampler's order)
draws from :func:`seeded_generator`, never from the global RNG: the same ``(seed, step)`` gives the same numbers on
every rank, machine and run, and a resumed run draws what the uninterrupted run would have drawn. Nothing here
talks to other ranks; :mod:`lightning_peft.distributed` re-exports both names.
"""

from __future__ import annotations

import torch

__all__ = ["seeded_generator", "stable_seed"]

_MASK64 = (1 << 64) - 1


def stable_seed(seed: int, step: int) -> int:
    """A 63-bit seed mixed from ``(seed, step)`` with splitmix64: the same on every rank, machine and run."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def seeded_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``(seed, step)``, for random choices all ranks must agree on.

    Every rank that asks for the same ``(seed, step)`` draws the same numbers, with no communication,
    and a resumed run draws what the uninterrupted run would have drawn. The global RNG is untouched.

    Example:
        >>> a = torch.randperm(10, generator=seeded_generator(0, 5))
        >>> b = torch.randperm(10, generator=seeded_generator(0, 5))
        >>> bool((a == b).all())
        True
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(stable_seed(seed, step))
    return gen
