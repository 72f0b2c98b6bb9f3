"""Per-item random streams: a generator seed from a tuple of integers, so that a draw depends on what it is for (the
run's seed, the step, the image's index, a stream tag) and not on the batch, process or device it happens in."""

from __future__ import annotations


def keyed_seed(*key: int) -> int:
    """A generator seed from a tuple of integers: Python's hash of the tuple, which for integers is the same in every
    process and run (no hash randomisation), cut to 63 bits."""
    return hash(key) & ((1 << 63) - 1)
