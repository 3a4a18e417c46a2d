"""Samplers and DataLoaders for training (sharded, reshuffled per epoch) and evaluation
(every image exactly once across ranks)."""
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class TrainSampler(Sampler[List[Tuple[int, int]]]):
    """Yields this rank's batches of (epoch, index) keys for one epoch.

    Like DistributedSampler with drop_last: one permutation per epoch from (seed, epoch),
    cut to a whole number of global batches, rank r taking every world_size-th index.
    Every rank gets the same number of batches, so DDP never waits on a missing one.
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
        self.epoch = 0
        self.steps_per_epoch = num_samples // global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All ranks' indices for one epoch, in the order they are consumed."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        return order[: self.steps_per_epoch * self.batch_size * self.world_size]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        mine = self.epoch_order(self.epoch)[self.rank :: self.world_size].tolist()
        for start in range(0, len(mine), self.batch_size):
            yield [(self.epoch, index) for index in mine[start : start + self.batch_size]]


class EvalSampler(Sampler[int]):
    """Rank r evaluates indices r, r + world_size, ...: no padding, no duplicates."""

    def __init__(self, num_samples: int, world_size: int, rank: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def _loader_options(workers: int, pin_memory: bool) -> dict:
    options = dict(num_workers=workers, pin_memory=pin_memory)
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def build_train_loader(dataset: Dataset, sampler: TrainSampler, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, **_loader_options(workers, pin_memory))


def build_eval_loader(
    dataset: Dataset, batch_size: int, world_size: int, rank: int, workers: int, pin_memory: bool
) -> Tuple[DataLoader, List[int]]:
    """The loader and the dataset indices it visits, in order."""
    sampler = EvalSampler(len(dataset), world_size, rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, **_loader_options(workers, pin_memory))
    return loader, sampler.indices
