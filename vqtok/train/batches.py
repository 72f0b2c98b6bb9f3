"""Which images each process sees at each step: a pure function of (seed, step), whatever the world size.

Epoch e visits the dataset in the order randperm(n) seeded by (seed, e), one global batch per optimizer step (the
incomplete tail is dropped). The global batch splits into `grad_accum` micro-batches, each split over the ranks.
Resuming at step s therefore continues with exactly the images an uninterrupted run would have seen, and one
process on the whole batch sees the same images as N processes on their shares.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's index list for every micro-batch of steps start_step .. max_steps - 1."""

    def __init__(self, n: int, *, batch_size: int, grad_accum: int, rank: int, world: int, seed: int,
                 start_step: int, max_steps: int):
        if batch_size % (grad_accum * world):
            raise ValueError(
                f"batch_size {batch_size} must be divisible by grad_accum x processes = {grad_accum} x {world}"
            )
        if n < batch_size:
            raise ValueError(f"the dataset holds {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.grad_accum, self.rank, self.world = n, batch_size, grad_accum, rank, world
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self.steps_per_epoch = n // batch_size
        self.per_rank = batch_size // (grad_accum * world)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        order, order_epoch = None, -1
        for step in range(self.start_step, self.max_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, epoch, self.seed), epoch
            batch = order[position * self.batch_size : (position + 1) * self.batch_size]
            for micro in batch.view(self.grad_accum, self.world, self.per_rank):
                yield micro[self.rank].tolist()
