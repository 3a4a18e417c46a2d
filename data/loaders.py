"""DataLoaders for training and evaluation from a recipe's DataConfig, and the workers' signal handling."""
import ctypes
import signal
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from common.errors import DataConfigError
from common.processes import DistContext

from .batches import SharedBatchRing
from .config import DataConfig
from .dataset import ImageDataset
from .fast_decode import ImageTransform
from .loader_faults import ReadProgress
from .sample_index import Sample, fingerprint_of
from .samplers import EvalSampler, TrainSampler
from .sources import training_splits
from .transforms import decode_path, eval_transform, training_transforms
from .unreadable import UnreadableImages, refuse_damaged

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PREFETCH_FACTOR = 4  # batches in flight per worker


class WorkerSignals:
    """Ignores SIGINT and SIGTERM, which reach every process of a job: dying of them, a worker would fail the step
    still to be saved. It ends with the training process: killed at its exit (cspresnet.console), or at its death."""

    def __call__(self, worker_id: int) -> None:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)  # the inherited pipe belongs to the training process's stop watchdog
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_options(workers: int, pin_memory: bool) -> dict:
    """DataLoader arguments. A private generator: an iterator draws a worker seed from it, which the global
    one (dropout, mixup) must not see, or a resumed run would differ."""
    options = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=SharedBatchRing(PREFETCH_FACTOR),
                   generator=torch.Generator().manual_seed(0))
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR, worker_init_fn=WorkerSignals())
    return options


def tracked(dataset: ImageDataset, workers: int, timeout_s: float) -> ImageDataset:
    """The dataset, recording what each worker reads and how long a batch may take (loader_faults.Batches)."""
    dataset.progress = ReadProgress(workers, timeout_s)
    return dataset


@dataclass
class TrainingData:
    train: DataLoader  # batches of (epoch, index) keys from `sampler`, one pass for the whole run
    sampler: TrainSampler
    train_set: ImageDataset
    val: DataLoader
    val_set: ImageDataset
    train_decode: str  # the recipe's, or "fast" where a GPU decode is not available
    unreadable: UnreadableImages  # the run's budget of unreadable training images
    fingerprints: Tuple[str, str]  # of the training and evaluation sets, as checkpoints record them
    jpegs: str  # what decodes the JPEGs, in words, for the start-up lines


def build_training_data(config: DataConfig, batch_size: int, seed: int, process: DistContext) -> TrainingData:
    """`batch_size` and config.eval_batch_size are global. A download that lost too much stops here."""
    options = loader_options(config.workers, pin_memory=process.device.type == "cuda")
    train_transform, val_transform, decode = training_transforms(config, process.device)
    train_set, val_set = build_splits(config, train_transform, val_transform, seed)
    tracked(train_set, config.workers, config.loader_timeout_s)
    fingerprints = fingerprint_of(train_set.samples), fingerprint_of(val_set.samples)
    for dataset, split in ((train_set, "training"), (val_set, "evaluation")):
        refuse_damaged(dataset, config.max_unreadable_fraction, config.min_unreadable_allowed, split)
    unreadable = UnreadableImages(train_set.samples, config.max_unreadable_batch_fraction,
                                  config.max_unreadable_fraction, config.min_unreadable_allowed)
    if len(train_set) < batch_size:
        raise DataConfigError(f"{config.dir}/train has {len(train_set)} images, fewer than one global batch "
                              f"(batch_size={batch_size}); lower batch_size")
    sampler = TrainSampler(len(train_set), batch_size // process.world_size, process.world_size, process.rank, seed)
    return TrainingData(DataLoader(train_set, batch_sampler=sampler, **options), sampler, train_set,
                        eval_loader(val_set, config, process), val_set, decode, unreadable, fingerprints,
                        f"training JPEGs: {decode_path(decode)}; evaluation JPEGs: {decode_path(config.eval_decode)}")


def build_splits(config: DataConfig, train: Optional[ImageTransform], val: Optional[ImageTransform],
                 seed: int) -> Tuple[ImageDataset, ImageDataset]:
    """The training and validation sets of data.dir, whichever source it holds (data/sources)."""
    train_index, val_index, classes = training_splits(config, seed)
    return ImageDataset(train_index, classes, train, seed=seed), ImageDataset(val_index, classes, val)


def eval_loader(dataset: ImageDataset, config: DataConfig, process: DistContext) -> DataLoader:
    """Every image exactly once across the processes; config.eval_batch_size is global."""
    sampler = EvalSampler(len(dataset), process.world_size, process.rank)
    return DataLoader(tracked(dataset, config.workers, config.loader_timeout_s),
                      batch_size=-(-config.eval_batch_size // process.world_size), sampler=sampler,
                      **loader_options(config.workers, pin_memory=process.device.type == "cuda"))


def build_eval_data(samples: Sequence[Sample], classes: List[str], config: DataConfig,
                    process: DistContext) -> Tuple[ImageDataset, DataLoader]:
    """An evaluation set (validate.py, predict.py, benchmarks) of a SampleIndex or (path, class) pairs."""
    dataset = ImageDataset(samples, classes, eval_transform(config.eval_img_size, config.eval_crop_pct,
                                                            config.eval_interpolation, config.eval_decode))
    refuse_damaged(dataset, config.max_unreadable_fraction, config.min_unreadable_allowed, "evaluation")
    return dataset, eval_loader(dataset, config, process)
