"""The data section of a recipe: where the images are and how they are read, augmented
and batched. It lives here, with the code that reads it, so that the data layer never
imports the training layer; cspresnet.recipe embeds it and checks its values."""
from dataclasses import dataclass
from typing import Literal, Tuple


class DataConfigError(ValueError):
    """A data setting that cannot work with this dataset or launch; the message names the key."""


@dataclass
class DataConfig:
    dir: str = ""  # ImageNet root holding train/<wnid>/ and val/<wnid>/, or tar shards (docs/shards.md)
    layout: Literal["auto", "class-folders", "shards"] = "auto"  # auto: class folders if dir/train/ exists, else shards
    shard_index_dir: str = ""  # where the shard index is cached; "": beside the shards, ~/.cache if read-only
    img_size: int = 256  # training crop
    workers: int = 8  # loader processes per training process
    # No batch from the workers for this long (a hung network mount, a stopped worker) ends
    # the run, naming the worker and its file; minutes, since a first batch may wait on a cold cache.
    loader_timeout_s: float = 300.0
    train_interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"  # random: bilinear or bicubic
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_ratio: Tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    train_decode: Literal["fast", "full", "gpu"] = "fast"  # fast: libjpeg-turbo + DCT scaling; gpu: nvJPEG
    eval_decode: Literal["full", "fast"] = "full"  # full: timm's evaluation, bit for bit
    eval_img_size: int = 256
    eval_crop_pct: float = 0.887  # resize the short side to floor(eval_img_size / crop_pct)
    eval_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    eval_batch_size: int = 256  # global, like batch_size
    # > 0: evaluate on this fraction of each class of train/, held out from training (chosen
    # from the seed), instead of on val/; for a dataset without a val/ folder.
    holdout_fraction: float = 0.0
    max_unreadable_batch_fraction: float = 0.5  # stop if more of one batch cannot be decoded
    max_unreadable_fraction: float = 0.001  # stop if more of the training set cannot be decoded ...
    min_unreadable_allowed: int = 10  # ... but always allow this many: a handful of bad files in a small set
