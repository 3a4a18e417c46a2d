"""Per-image transforms (in loader workers, to uint8 HWC) and the batch work on the device (docs/performance.md)."""
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from PIL import Image
from timm.data import Mixup, RandomResizedCropAndInterpolation, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from . import jpeg_box
from .fast_decode import FastCenterCrop, FastRandomResizedCrop, ImageTransform, load_rgb, pil_to_hwc_uint8
from .gpu_decode import EncodedRandomResizedCrop, gpu_decode_available

log = logging.getLogger(__name__)
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass
class FullDecode(ImageTransform):
    """Decode the whole file to RGB with Pillow, then run PIL transforms on it: timm's way."""

    steps: transforms.Compose
    uses_numpy_random: bool = False

    def decode(self, data: bytes) -> Image.Image:
        return load_rgb(data)

    def finish(self, image: Image.Image) -> torch.Tensor:
        return self.steps(image)


def train_transform(img_size: int, scale: Tuple[float, float] = (0.08, 1.0),
                    ratio: Tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear", hflip: float = 0.5,
                    auto_augment: str = "", decode: str = "full") -> ImageTransform:
    """Random-resized crop, flip, RandAugment. decode="full" is timm's transform exactly; "fast" draws the
    crops alike and decodes faster (fast_decode); "gpu" leaves the decoding to the device (gpu_decode)."""
    augment = None
    if auto_augment:  # timm's RandAugment, with the hyper-parameters timm's training transform gives it
        hparams = dict(translate_const=int(img_size * 0.45),
                       img_mean=tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN))
        if interpolation != "random":
            hparams["interpolation"] = Image.Resampling[interpolation.upper()]
        augment = rand_augment_transform(auto_augment, hparams)
    names = ["bilinear", "bicubic"] if interpolation == "random" else [interpolation]
    if decode == "fast":
        return FastRandomResizedCrop(img_size, scale, ratio, names, hflip, augment)
    if decode == "gpu":  # the worker half; the normaliser decodes on the device
        if augment is not None:
            raise ValueError("RandAugment works on PIL images in the workers and cannot follow a GPU decode")
        return EncodedRandomResizedCrop(img_size, scale, ratio, names, hflip)
    steps = [RandomResizedCropAndInterpolation(img_size, scale=scale, ratio=ratio, interpolation=interpolation)]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    if augment is not None:
        steps.append(augment)
    return FullDecode(transforms.Compose([*steps, pil_to_hwc_uint8]), uses_numpy_random=augment is not None)


class SizeByEpoch(ImageTransform):
    """Each epoch's crop size (progressive resizing), by the epoch the sampler's keys carry: workers that
    run ahead into the next epoch crop at its size, and a resumed run as the uninterrupted one did."""

    def __init__(self, by_size: Dict[int, ImageTransform], size_of_epoch: Callable[[int], int]):
        self.by_size, self.size_of_epoch = by_size, size_of_epoch
        self.uses_numpy_random = any(t.uses_numpy_random for t in by_size.values())

    def at(self, epoch: int) -> ImageTransform:
        return self.by_size[self.size_of_epoch(epoch)]


def training_transforms(config, device: torch.device) -> Tuple[ImageTransform, ImageTransform, str]:
    """The training and evaluation transforms, and the training decode: gpu only where nvJPEG runs on `device`."""
    decode = config.train_decode
    if decode == "gpu":
        available, reason = gpu_decode_available(device)
        if not available:
            log.warning("data.train_decode=gpu but %s: decoding on the CPU workers (fast) instead", reason)
            decode = "fast"
    by_size = {size: train_transform(size, config.crop_scale, config.crop_ratio, config.train_interpolation,
                                     config.hflip, config.auto_augment, decode) for size in config.train_sizes()}
    train = SizeByEpoch(by_size, config.train_size) if len(by_size) > 1 else by_size[config.img_size]
    return train, eval_transform(config.eval_img_size, config.eval_crop_pct, config.eval_interpolation,
                                 config.eval_decode), decode


def decode_path(decode: str) -> str:
    """What decodes the JPEGs for a `decode` setting, in words, for the start-up lines."""
    if decode == "fast":
        return jpeg_box.status()
    if decode == "gpu":
        return "nvJPEG on the device; the workers read the files and draw the crops"
    return "Pillow, whole files (timm's transform)"


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """timm's rule: the short side is resized to floor(img_size / crop_pct) (256 / 0.887 -> 288)."""
    return math.floor(img_size / crop_pct)


def eval_transform(img_size: int, crop_pct: float, interpolation: str = "bilinear",
                   decode: str = "full") -> ImageTransform:
    """decode="full" is timm's, bit for bit; "fast" decodes and resizes only the kept box (predictions move)."""
    if decode == "fast":
        return FastCenterCrop(img_size, eval_resize_size(img_size, crop_pct), interpolation)
    resize = transforms.Resize(eval_resize_size(img_size, crop_pct), interpolation=INTERPOLATIONS[interpolation])
    return FullDecode(transforms.Compose([resize, transforms.CenterCrop(img_size), pil_to_hwc_uint8]))


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of the model's weights and inputs: channels_last runs convolutions faster on GPUs."""
    return torch.channels_last if channels_last else torch.contiguous_format


class DevicePreprocess:
    """A loader's batch (uint8 NHWC, on the host or the device) -> the model's input: normalised float32 NCHW."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device, self.memory_format = device, memory_format(channels_last)
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # a channels_last view
        batch = batch.float().div_(255).sub_(self.mean).div_(self.std)
        return batch.contiguous(memory_format=self.memory_format)


class BatchAugment:
    """timm's batch augmentations on the device: random erasing (as its prefetcher), then mixup/cutmix."""

    def __init__(self, erasing: Optional[RandomErasing], mixup: Optional[Mixup]):
        self.erasing, self.mixup = erasing, mixup

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if self.erasing is not None:
            inputs = self.erasing(inputs)
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        return inputs, targets


def build_batch_augment(augment, label_smoothing: float, num_classes: int,
                        device: torch.device) -> Optional[BatchAugment]:
    """None when the recipe asks for neither (the darknet recipe)."""
    erasing = RandomErasing(augment.random_erasing, mode=augment.random_erasing_mode, device=device) \
        if augment.random_erasing > 0 else None
    mixup = Mixup(mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha, prob=augment.mixup_prob,
                  switch_prob=augment.mixup_switch_prob, label_smoothing=label_smoothing,
                  num_classes=num_classes) if augment.mixing else None
    return BatchAugment(erasing, mixup) if erasing or mixup else None
