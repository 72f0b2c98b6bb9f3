"""Per-item random streams: a generator seed from a tuple of integers, so that a draw depends on what it is for (the
run's seed, the step, the image's index, a stream tag) and not on the batch, process or device it happens in."""

from __future__ import annotations


def keyed_seed(*key: int) -> int:
    """A generator seed from a tuple of integers: Python's hash of the tuple, which for integers is the same in every
    process and run (no hash randomisation), cut to 63 bits."""
    return hash(key) & ((1 << 63) - 1)


def keyed_uniform(*key: int) -> float:
    """A uniform draw in [0, 1) from a tuple of integers, in plain Python (no generator, no tensor to read back):
    splitmix64 of `keyed_seed(*key)`, its top 53 bits. The loop's per-image coins (flips, class dropout)."""
    z = (keyed_seed(*key) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


_MASK64 = (1 << 64) - 1
