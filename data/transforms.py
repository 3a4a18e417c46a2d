"""Per-image transforms (on PIL images, in loader workers) and the batch normalisation
(on the training device).

Workers return uint8 HWC tensors: a quarter of the bytes of float32 through the worker
queues and the host-to-device copy. Normalisation then runs on the device with the same
float32 operations as torchvision's ToTensor + Normalize, so results are bit-identical to
timm's CPU transform.
"""
import math
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, RandomResizedCropAndInterpolation, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def pil_to_hwc_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def train_transform(
    img_size: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    hflip: float = 0.5,
    auto_augment: str = "",
) -> transforms.Compose:
    """timm's training transform: random-resized crop (interpolation may be 'random':
    bilinear or bicubic per image), flip, then RandAugment with timm's hyper-parameters."""
    steps = [RandomResizedCropAndInterpolation(img_size, scale=scale, ratio=ratio, interpolation=interpolation)]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    if auto_augment:
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN))
        if interpolation != "random":
            hparams["interpolation"] = Image.Resampling[interpolation.upper()]
        steps.append(rand_augment_transform(auto_augment, hparams))
    steps.append(pil_to_hwc_uint8)
    return transforms.Compose(steps)


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """timm's rule: the short side is resized to floor(img_size / crop_pct) (256 / 0.887 -> 288)."""
    return math.floor(img_size / crop_pct)


def eval_transform(img_size: int, crop_pct: float, interpolation: str = "bilinear") -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(eval_resize_size(img_size, crop_pct), interpolation=INTERPOLATIONS[interpolation]),
        transforms.CenterCrop(img_size),
        pil_to_hwc_uint8,
    ])


class DeviceNormalizer:
    """uint8 NHWC batch on the host -> normalised float32 NCHW batch on the device."""

    def __init__(self, device: torch.device, channels_last: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # a channels_last view
        batch = batch.float().div_(255).sub_(self.mean).div_(self.std)
        return batch.contiguous(memory_format=self.memory_format)


class BatchAugment:
    """The augmentations that timm applies to a whole normalised batch on the device:
    random erasing (as timm's prefetcher does), then mixup/cutmix, which also turns the
    targets into soft labels (with the label smoothing folded in)."""

    def __init__(self, erasing: Optional[RandomErasing], mixup: Optional[Mixup]):
        self.erasing = erasing
        self.mixup = mixup

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if self.erasing is not None:
            inputs = self.erasing(inputs)
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        return inputs, targets


def build_batch_augment(augment, label_smoothing: float, num_classes: int, device: torch.device) -> Optional[BatchAugment]:
    """None when the recipe asks for neither (the seed recipe)."""
    erasing = RandomErasing(augment.random_erasing, mode=augment.random_erasing_mode, device=device) \
        if augment.random_erasing > 0 else None
    mixup = None
    if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:
        mixup = Mixup(mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha, prob=augment.mixup_prob,
                      switch_prob=augment.mixup_switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)
    return BatchAugment(erasing, mixup) if erasing or mixup else None
