"""The data package's sections of a recipe (cspresnet.recipe embeds them), each checking its own values."""
from dataclasses import dataclass
from typing import Literal, Tuple

from common.recipe_fields import KeyName, recipe_key, require, setting


@dataclass
class DataConfig:
    dir: str = setting("", affects_results=False)  # ImageNet root with train/<wnid>/ and val/<wnid>/, or tar shards
    # auto: whichever dir holds; else a row of data/sources/__init__.py's SOURCES (checked by the recipe)
    layout: str = setting("auto", affects_results=False)
    index_dir: str = setting("", affects_results=False)  # the samples' index; "": beside them, ~/.cache if read-only
    img_size: int = 256  # training crop; with start_img_size, the size it grows to
    # Progressive resizing (FFCV's): > 0, the training crop is this up to epoch size_ramp_epochs[0] (from 0),
    # img_size from size_ramp_epochs[1], in between linear, rounded to a multiple of 32. 0: img_size throughout.
    start_img_size: int = 0
    size_ramp_epochs: Tuple[int, int] = (0, 0)
    workers: int = setting(8, affects_results=False)  # loader processes per training process
    # No batch for this long ends the run, naming each worker's file; minutes: a first batch may wait on a cold cache
    loader_timeout_s: float = setting(300.0, affects_results=False)
    # Per image, in the loader:
    train_interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"  # random: bilinear or bicubic
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_ratio: Tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    auto_augment: str = ""  # RandAugment policy, e.g. rand-m9-mstd0.5; "" = off
    train_decode: Literal["fast", "full", "gpu"] = "fast"  # fast: libjpeg-turbo + DCT scaling; gpu: nvJPEG
    eval_decode: Literal["full", "fast"] = "full"  # full: timm's evaluation, bit for bit
    eval_img_size: int = 256
    eval_crop_pct: float = 0.887  # resize the short side to floor(eval_img_size / crop_pct)
    eval_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    eval_batch_size: int = 256  # global, like batch_size
    holdout_fraction: float = 0.0  # > 0: evaluate on this fraction of each train/ class (by the seed), not val/
    # Undecodable files are skipped and counted; these decide when the run stops instead.
    max_unreadable_batch_fraction: float = setting(0.5, affects_results=False)  # of one batch
    max_unreadable_fraction: float = setting(0.001, affects_results=False)  # of the training set ...
    min_unreadable_allowed: int = setting(10, affects_results=False)  # ... but always this many

    def check(self, key: KeyName = recipe_key("data")) -> None:
        require(self.img_size >= 32, key("img_size"), ">= 32 (the network downsamples 32x)", self.img_size)
        if self.start_img_size:
            for name, size in (("start_img_size", self.start_img_size), ("img_size", self.img_size)):
                require(size % 32 == 0 and size >= 32, key(name), "a multiple of 32 of at least 32 with "
                        "data.start_img_size set (the sizes grow in steps of 32)", size)
            require(self.start_img_size <= self.img_size, key("start_img_size"),
                    f"at most data.img_size={self.img_size}, the size it grows to", self.start_img_size)
            first, last = self.size_ramp_epochs
            require(0 <= first <= last, key("size_ramp_epochs"), "[first, last] epochs, counted from 0, first <= last",
                    list(self.size_ramp_epochs))
        else:
            require(self.size_ramp_epochs == (0, 0), key("size_ramp_epochs"),
                    "[0, 0] without data.start_img_size", list(self.size_ramp_epochs))
        require(self.loader_timeout_s > 0, key("loader_timeout_s"), "> 0 (seconds without a batch that end the run)",
                self.loader_timeout_s)
        require(0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0, key("crop_scale"),
                "[min, max] with 0 < min <= max <= 1", list(self.crop_scale))
        require(0.0 < self.crop_ratio[0] <= self.crop_ratio[1], key("crop_ratio"), "[min, max] with 0 < min <= max",
                list(self.crop_ratio))
        require(0.0 <= self.hflip <= 1.0, key("hflip"), "a probability in [0, 1]", self.hflip)
        require(self.auto_augment == "" or self.auto_augment.startswith("rand-"), key("auto_augment"),
                "'' (off) or a RandAugment policy like rand-m9-mstd0.5", self.auto_augment)
        require(self.train_decode != "gpu" or not self.auto_augment, key("train_decode"),
                "fast or full with data.auto_augment (RandAugment runs on the CPU, before any GPU decode)",
                self.train_decode)
        self.check_evaluation(key)
        require(0.0 <= self.holdout_fraction < 1.0, key("holdout_fraction"), "in [0, 1) (0: evaluate on val/)",
                self.holdout_fraction)
        require(0.0 < self.max_unreadable_batch_fraction < 1.0, key("max_unreadable_batch_fraction"),
                "in (0, 1): a batch must keep at least one image", self.max_unreadable_batch_fraction)
        require(0.0 <= self.max_unreadable_fraction < 1.0, key("max_unreadable_fraction"), "in [0, 1)",
                self.max_unreadable_fraction)
        require(self.min_unreadable_allowed >= 0, key("min_unreadable_allowed"), ">= 0", self.min_unreadable_allowed)

    def train_size(self, epoch: int) -> int:
        """The training crop of `epoch` (counted from 0): FFCV's get_resolution."""
        first, last = self.size_ramp_epochs
        if not self.start_img_size or epoch >= last:
            return self.img_size
        if epoch <= first:
            return self.start_img_size
        size = self.start_img_size + (self.img_size - self.start_img_size) * (epoch - first) / (last - first)
        return round(size / 32) * 32  # halves to even, as numpy's round in FFCV's

    def train_sizes(self) -> list:
        return list(range(self.start_img_size, self.img_size + 1, 32)) if self.start_img_size else [self.img_size]

    def check_evaluation(self, key: KeyName = recipe_key("data")) -> None:
        """What evaluation reads: validate.py sets these from its options, and checks them here."""
        require(self.eval_img_size >= 32, key("eval_img_size"), ">= 32 (the network downsamples 32x)",
                self.eval_img_size)
        require(0.0 < self.eval_crop_pct <= 1.0, key("eval_crop_pct"), "in (0, 1]", self.eval_crop_pct)
        require(self.eval_batch_size >= 1, key("eval_batch_size"), ">= 1", self.eval_batch_size)
        require(self.workers >= 0, key("workers"), ">= 0", self.workers)


@dataclass
class AugmentConfig:
    """What is done to a batch on the device, after the per-image augmentation; all off by default (timm's)."""

    random_erasing: float = 0.0  # probability per image, applied to the normalised batch
    random_erasing_mode: Literal["pixel", "rand", "const"] = "pixel"
    mixup_alpha: float = 0.0  # mixup on when > 0
    cutmix_alpha: float = 0.0  # cutmix on when > 0
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def check(self, key: KeyName = recipe_key("augment")) -> None:
        require(0.0 <= self.random_erasing <= 1.0, key("random_erasing"), "a probability in [0, 1]",
                self.random_erasing)
        require(self.mixup_alpha >= 0.0, key("mixup_alpha"), ">= 0 (0: off)", self.mixup_alpha)
        require(self.cutmix_alpha >= 0.0, key("cutmix_alpha"), ">= 0 (0: off)", self.cutmix_alpha)
        require(0.0 <= self.mixup_prob <= 1.0, key("mixup_prob"), "a probability in [0, 1]", self.mixup_prob)
        require(0.0 <= self.mixup_switch_prob <= 1.0, key("mixup_switch_prob"), "a probability in [0, 1]",
                self.mixup_switch_prob)
