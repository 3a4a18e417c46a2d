"""DataLoaders for training and evaluation, built from the data section of a recipe
(data.config.DataConfig), and the loader workers' signal handling."""
import ctypes
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Protocol, Tuple

import torch
from torch.utils.data import DataLoader

from .batches import SharedBatchRing
from .config import DataConfig
from .errors import DataConfigError
from .fast_decode import ImageTransform
from .gpu_decode import gpu_decode_available, warn_fallback
from .loader_faults import ReadProgress
from .samplers import EvalSampler, TrainSampler
from .sources.class_folders import ImageFolderDataset, Sample, build_imagenet_splits
from .sources.layout import NAMES, SPLIT_BUILDERS, detect_layout, split_dataset
from .sources.shards import ShardSplit
from .transforms import SizeByEpoch, eval_transform, train_transform
from .unreadable import refuse_damaged

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerSignals:
    """A loader worker's signal handling, set as it starts: it ignores SIGINT and SIGTERM.

    The training process decides when its workers end. Ctrl-C reaches the whole process
    group, and a scheduler may signal every process of a job (SLURM does, and torchrun
    forwards its own copy to each rank's process group): a worker that died of it would
    fail the step that the training process still has to finish and save. The training
    process kills its workers when it exits (cspresnet.console.end_child_processes), and
    the kernel kills them when it dies (a parent-death signal, which also reaches a
    stopped or stuck worker), so no worker outlives its job.
    """

    def __call__(self, worker_id: int) -> None:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)  # the inherited pipe belongs to the training process's stop watchdog
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


PREFETCH_FACTOR = 4  # batches in flight per worker


def loader_options(workers: int, pin_memory: bool) -> dict:
    """DataLoader arguments shared by training, evaluation and benchmarks.loader."""
    # A private generator: creating a loader iterator draws a worker seed from it, and the
    # global generator (dropout, mixup) must not see that draw or a resumed run would differ.
    options = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=SharedBatchRing(PREFETCH_FACTOR),
                   generator=torch.Generator().manual_seed(0))
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR, worker_init_fn=WorkerSignals())
    return options


def tracked(dataset: ImageFolderDataset, workers: int, timeout_s: float) -> ImageFolderDataset:
    """The dataset, recording which sample each of `workers` reads (before they fork), and
    how long its loader may take for a batch (data.loader_faults.Batches)."""
    dataset.progress = ReadProgress(workers, timeout_s)
    return dataset


class Process(Protocol):
    """Which process of how many, on which device: cspresnet.distributed.DistContext is one."""

    rank: int
    world_size: int
    device: torch.device


@dataclass
class TrainingData:
    train: DataLoader  # batches of (epoch, index) keys from `sampler`, one pass for the whole run
    sampler: TrainSampler
    train_set: ImageFolderDataset
    val: DataLoader
    val_set: ImageFolderDataset
    train_decode: str  # the recipe's, or "fast" where a GPU decode is not available


def build_training_data(config: DataConfig, batch_size: int, seed: int, process: Process) -> TrainingData:
    """`batch_size` and config.eval_batch_size are global, across the processes."""
    decode = config.train_decode
    if decode == "gpu":
        available, reason = gpu_decode_available(process.device)
        if not available:
            warn_fallback(reason)
            decode = "fast"
    by_size = {size: train_transform(size, config.crop_scale, config.crop_ratio, config.train_interpolation,
                                     config.hflip, config.auto_augment, decode) for size in config.train_sizes()}
    train_set, val_set = build_splits(
        config,
        SizeByEpoch(by_size, config.train_size) if len(by_size) > 1 else by_size[config.img_size],
        eval_transform(config.eval_img_size, config.eval_crop_pct, config.eval_interpolation, config.eval_decode),
        seed=seed,
    )
    for dataset, split in ((train_set, "training"), (val_set, "evaluation")):
        refuse_damaged(dataset, config.max_unreadable_fraction, config.min_unreadable_allowed, split)
    if len(train_set) < batch_size:
        raise DataConfigError(f"{config.dir}/train has {len(train_set)} images, fewer than one global batch "
                              f"(batch_size={batch_size}); lower batch_size")
    sampler = TrainSampler(len(train_set), batch_size // process.world_size, process.world_size, process.rank, seed)
    train = DataLoader(tracked(train_set, config.workers, config.loader_timeout_s), batch_sampler=sampler,
                       **loader_options(config.workers, pin_memory=process.device.type == "cuda"))
    return TrainingData(train, sampler, train_set, eval_loader(val_set, config, process), val_set, decode)


def build_splits(config: DataConfig, train: ImageTransform, val: ImageTransform,
                 seed: int) -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """Class folders, tar shards, ImageNet's archives or Kaggle's download: data.layout, or
    (auto) whichever data.dir holds."""
    root = Path(config.dir).expanduser()
    layout = detect_layout(root, config.layout) if config.dir else "class-folders"
    if layout == "class-folders":
        return build_imagenet_splits(config.dir, train, val, seed, config.holdout_fraction, config.index_dir)
    if config.holdout_fraction > 0:
        raise DataConfigError(f"recipe key 'data.holdout_fraction' is {config.holdout_fraction}, but {root} holds "
                              f"{NAMES[layout]}, which carry their own validation set; set it to 0")
    return SPLIT_BUILDERS[layout](root, train, val, seed, config.index_dir)


def eval_loader(dataset: ImageFolderDataset, config: DataConfig, process: Process) -> DataLoader:
    """Every image exactly once across the processes; config.eval_batch_size is global."""
    sampler = EvalSampler(len(dataset), process.world_size, process.rank)
    return DataLoader(tracked(dataset, config.workers, config.loader_timeout_s),
                      batch_size=-(-config.eval_batch_size // process.world_size), sampler=sampler,
                      **loader_options(config.workers, pin_memory=process.device.type == "cuda"))


def build_eval_data(samples: List[Sample], classes: List[str], config: DataConfig, process: Process,
                    shards: Optional[ShardSplit] = None) -> Tuple[ImageFolderDataset, DataLoader]:
    """An evaluation set (validate.py, predict.py, benchmarks) read with config's evaluation
    transform; from `shards` when given (their samples are `samples`)."""
    transform = eval_transform(config.eval_img_size, config.eval_crop_pct, config.eval_interpolation,
                               config.eval_decode)
    dataset = split_dataset(shards, classes, transform) if shards else ImageFolderDataset(samples, classes, transform)
    refuse_damaged(dataset, config.max_unreadable_fraction, config.min_unreadable_allowed, "evaluation")
    return dataset, eval_loader(dataset, config, process)
