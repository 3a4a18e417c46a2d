"""Samplers and DataLoaders for training (sharded, reshuffled per epoch, resumable
mid-epoch) and evaluation (every image exactly once across ranks)."""
import ctypes
import math
import signal
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .gpu_decode import EncodedBatch, EncodedImage
from .imagenet import ImageFolderDataset, UnreadableDataError


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


@dataclass
class Batch:
    images: Union[torch.Tensor, EncodedBatch]  # uint8 (n, H, W, 3), or JPEGs to decode on the GPU
    targets: torch.Tensor  # (n,)
    indices: torch.Tensor  # (n,) their dataset indices
    unreadable: List[Tuple[int, str]]  # (dataset index, reason) for each sample that failed to decode

    @property
    def requested(self) -> int:
        return len(self.targets) + len(self.unreadable)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.indices, self.unreadable)

    # From a loader worker, every tensor crosses through a shared-memory file of its own,
    # ~0.6 ms of the training process's wall time each (benchmarks.handover); the labels and
    # indices go as lists instead.
    def __getstate__(self) -> Dict:
        return dict(self.__dict__, targets=self.targets.tolist(), indices=self.indices.tolist())

    def __setstate__(self, state: Dict) -> None:
        self.__dict__.update(state, targets=torch.tensor(state["targets"], dtype=torch.long),
                             indices=torch.tensor(state["indices"], dtype=torch.long))


def collate_batch(samples, out: Optional[torch.Tensor] = None) -> Batch:
    """Stack the decodable samples (into `out` if given); list the others with their reason."""
    good = [s for s in samples if s[0] is not None]
    unreadable = [(index, error) for image, _, index, error in samples if image is None]
    if good and isinstance(good[0][0], EncodedImage):
        images = EncodedBatch.pack([s[0] for s in good])
    elif good:
        images = torch.stack([s[0] for s in good], out=None if out is None else out[:len(good)])
    else:
        images = torch.empty(0, dtype=torch.uint8)
    targets = torch.tensor([s[1] for s in good], dtype=torch.long)
    indices = torch.tensor([s[2] for s in good], dtype=torch.long)
    return Batch(images, targets, indices, unreadable)


class SharedBatchRing:
    """collate_batch; in a loader worker, into a ring of shared-memory buffers that the
    worker allocates once and then reuses.

    Why: a batch must be in shared memory to reach the main process, and fresh shared
    memory is slow to fill (a page fault per 4 KiB: ~170 us an image here, more than the
    crop and resize). torch's own collate allocates it fresh for every batch.

    Why it is safe: the DataLoader hands worker w its next task only when it yields one
    of w's batches, and keeps at most prefetch_factor tasks per worker in flight. With a
    ring of prefetch_factor + 2 buffers, a buffer is refilled only after two more of its
    worker's batches have been yielded, by which time the main process is done with it
    (train.py and evaluation consume each batch before asking for the next; with
    pin_memory it is copied out even before it is yielded). Keeping a batch longer (say,
    list(loader)) needs a copy of its images.
    """

    def __init__(self, prefetch_factor: int):
        self.buffers: List[Optional[torch.Tensor]] = [None] * (prefetch_factor + 2)
        self.next = 0  # each worker process has its own copy of this object, and so its own ring

    def __call__(self, samples) -> Batch:
        first = next((s[0] for s in samples if s[0] is not None), None)
        if torch.utils.data.get_worker_info() is None or not isinstance(first, torch.Tensor):
            return collate_batch(samples)  # the main process, or JPEGs for the GPU decoder: small
        shape = (len(samples), *first.shape)
        buffer = self.buffers[self.next]
        if buffer is None or buffer.shape[1:] != shape[1:] or len(buffer) < len(samples):
            buffer = self.buffers[self.next] = torch.empty(shape, dtype=first.dtype).share_memory_()
        self.next = (self.next + 1) % len(self.buffers)
        return collate_batch(samples, out=buffer)


class UnreadableImages:
    """Skips files that cannot be decoded, warns once per file, counts them, and stops the
    run when more than the allowed fraction of a batch is unreadable, or more distinct files
    than the set's budget: the larger of `min_allowed` and `max_fraction` of the set (a
    floor, so that a few bad files in a small set train through). Each rank checks the
    files it has seen against the whole budget: the sampler reshuffles every epoch, so a
    rank meets most bad files within a few epochs. Skipping never changes which images the
    sampler serves."""

    def __init__(self, dataset: ImageFolderDataset, max_batch_fraction: float, max_fraction: float,
                 min_allowed: int):
        self.samples = dataset.samples
        self.max_batch_fraction = max_batch_fraction
        self.budget_rule = (f"the larger of data.min_unreadable_allowed={min_allowed} and "
                            f"data.max_unreadable_fraction={max_fraction:g} x {len(dataset)} images")
        self.limit = max(min_allowed, int(max_fraction * len(dataset)))
        self.seen: set = set()
        self.epoch_count = 0

    def check(self, batch: Batch) -> None:
        if not batch.unreadable:
            return
        for index, reason in batch.unreadable:
            if index not in self.seen:
                self.seen.add(index)
                print(f"warning: skipping unreadable image {self.samples[index][0]} ({reason}); "
                      f"{len(self.seen)} of the {self.limit} allowed", file=sys.stderr, flush=True)
        self.epoch_count += len(batch.unreadable)
        example = f"{self.samples[batch.unreadable[0][0]][0]}: {batch.unreadable[0][1]}"
        if len(batch.unreadable) > self.max_batch_fraction * batch.requested:
            raise UnreadableDataError(
                f"{len(batch.unreadable)} of the {batch.requested} images of one batch could not be decoded "
                f"(data.max_unreadable_batch_fraction={self.max_batch_fraction}); e.g. {example}"
            )
        if len(self.seen) > self.limit:
            raise UnreadableDataError(
                f"{len(self.seen)} distinct training images could not be decoded, more than the {self.limit} allowed "
                f"({self.budget_rule}); e.g. {example}. Repair or remove the files, or raise either key"
            )

    def state_dict(self) -> Dict:
        return {"seen": sorted(self.seen), "epoch_count": self.epoch_count}

    def load_state_dict(self, state: Dict) -> None:
        self.seen = set(state["seen"])
        self.epoch_count = state["epoch_count"]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerSignals:
    """A loader worker's signal handling, set as it starts.

    SIGINT (Ctrl-C reaches the whole process group) is ignored: the training process decides.
    A first SIGTERM (a scheduler may signal every process of a job) leaves the worker serving
    the batches that the training process needs to finish its step and save, but arms an
    alarm that ends it within `timeout_s`; a second SIGTERM ends it at once. The training
    process kills its workers when it exits (cspresnet.signals.end_child_processes), and the
    kernel kills them when it dies (a parent-death signal, which also reaches a stopped or
    stuck worker), so no worker outlives its job.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __call__(self, worker_id: int) -> None:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)  # the inherited pipe belongs to the training process's stop watchdog
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._first_sigterm)

    def _first_sigterm(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.alarm(max(1, math.ceil(self.timeout_s)))  # SIGALRM's default action ends the process


PREFETCH_FACTOR = 4  # batches in flight per worker


def loader_options(workers: int, pin_memory: bool, stop_timeout_s: float = 60.0) -> dict:
    """DataLoader arguments shared by training, evaluation and benchmarks.loader."""
    # A private generator: creating a loader iterator draws a worker seed from it, and the
    # global generator (dropout, mixup) must not see that draw or a resumed run would differ.
    options = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=SharedBatchRing(PREFETCH_FACTOR),
                   generator=torch.Generator().manual_seed(0))
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR,
                       worker_init_fn=WorkerSignals(stop_timeout_s))
    return options


def build_train_loader(dataset: Dataset, sampler: TrainSampler, workers: int, pin_memory: bool,
                       stop_timeout_s: float = 60.0) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, **loader_options(workers, pin_memory, stop_timeout_s))


def build_eval_loader(
    dataset: Dataset, batch_size: int, world_size: int, rank: int, workers: int, pin_memory: bool,
    stop_timeout_s: float = 60.0,
) -> DataLoader:
    sampler = EvalSampler(len(dataset), world_size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      **loader_options(workers, pin_memory, stop_timeout_s))
