"""Which images each rank sees: training batches, resumable mid-epoch, and evaluation (each image once)."""
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler[List[Tuple[int, int]]]):
    """This rank's batches of (epoch, index) keys, like DistributedSampler with drop_last, over one or more epochs."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"the training set has {num_samples} images, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes = {global_batch})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.steps_per_epoch = num_samples // global_batch
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0, end_epoch: Optional[int] = None) -> None:
        """Serve `epoch` from batch `start_step` on (to resume mid-epoch), then each epoch before `end_epoch`."""
        end_epoch = epoch + 1 if end_epoch is None else end_epoch
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        if end_epoch <= epoch:
            raise ValueError(f"end_epoch {end_epoch} must come after epoch {epoch}")
        self.epoch, self.start_step, self.end_epoch = epoch, start_step, end_epoch

    def __len__(self) -> int:
        return (self.end_epoch - self.epoch) * self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        start_step, used = self.start_step, self.steps_per_epoch * self.batch_size * self.world_size
        for epoch in range(self.epoch, self.end_epoch):
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_samples, generator=generator)  # all ranks' indices, in the order consumed
            mine = order[self.rank : used : self.world_size].tolist()
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
