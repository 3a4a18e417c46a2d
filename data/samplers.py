"""Which images each rank sees: training batches (sharded, reshuffled per epoch, resumable
mid-epoch, one pass through several epochs) and evaluation (every image exactly once)."""
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler[List[Tuple[int, int]]]):
    """Yields this rank's batches of (epoch, index) keys, epoch after epoch.

    Like DistributedSampler with drop_last: one permutation per epoch from (seed, epoch),
    cut to a whole number of global batches, rank r taking every world_size-th index.
    Every rank gets the same number of batches, so DDP never waits on a missing one.

    One pass may run through several epochs (`set_epoch(..., end_epoch=...)`), so that
    the loader's workers go on decoding at an epoch's end instead of draining and
    starting again from an empty queue, a wait of one worker's whole batch for the GPU.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} images, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes = {global_batch})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0, end_epoch: Optional[int] = None) -> None:
        """Serve `epoch` from its batch number `start_step` on (to resume mid-epoch), then
        every following epoch before `end_epoch` (default: `epoch` alone)."""
        end_epoch = epoch + 1 if end_epoch is None else end_epoch
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        if end_epoch <= epoch:
            raise ValueError(f"end_epoch {end_epoch} must come after epoch {epoch}")
        self.epoch = epoch
        self.start_step = start_step
        self.end_epoch = end_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All ranks' indices for one epoch, in the order they are consumed."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        return order[: self.steps_per_epoch * self.batch_size * self.world_size]

    def __len__(self) -> int:
        return (self.end_epoch - self.epoch) * self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        start_step = self.start_step
        for epoch in range(self.epoch, self.end_epoch):
            mine = self.epoch_order(epoch)[self.rank :: self.world_size].tolist()
            for start in range(start_step * self.batch_size, len(mine), self.batch_size):
                yield [(epoch, index) for index in mine[start : start + self.batch_size]]
            start_step = 0


class EvalSampler(Sampler[int]):
    """Rank r evaluates indices r, r + world_size, ...: no padding, no duplicates."""

    def __init__(self, num_samples: int, world_size: int, rank: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
