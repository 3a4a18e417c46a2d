"""The fast CPU path: decode only the crop's box, DCT-scaled where it shrinks, then resize (docs/performance.md)."""
import contextlib
import io
import math
import random
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import RandomResizedCropAndInterpolation

from .jpeg_box import box_decoder

Box = Tuple[int, int, int, int]  # top, left, height, width in pixels of the stored image
# What undecodable files raise: Pillow's unidentified or truncated ones OSError, broken headers SyntaxError, ValueError
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_buffer = np.empty(0, dtype=np.uint8)  # reused decode target: a fresh 0.5 MB array a call costs page faults


class ImageTransform:
    """`decode` fails on a bad file, `finish` only computes: the dataset tells a broken file from a broken transform."""

    # Whether a step draws from NumPy's global generator (RandAugment): only then is it seeded per sample (costly)
    uses_numpy_random = False

    def decode(self, data: bytes):
        raise NotImplementedError

    def finish(self, decoded):
        return decoded

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.finish(self.decode(data))

    def at(self, epoch: int) -> "ImageTransform":
        """This one, unless the crop size changes with the epoch (transforms.SizeByEpoch)."""
        return self


def load_rgb(data: bytes) -> Image.Image:
    """Pillow's full decode to RGB, whatever the stored mode (grayscale, CMYK, a PNG named .JPEG): timm's pixels."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its own message names a BytesIO object, which tells nobody anything
        raise UnidentifiedImageError(f"not an image Pillow can read ({len(data)} bytes, starting {data[:8]!r})") \
            from None
    with image:
        return image.convert("RGB")


def pil_to_hwc_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def jpeg_dimensions(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) if libjpeg-turbo (and nvJPEG) can decode these bytes to RGB; None for Pillow's files."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in ("YCbCr", "Gray", "RGB") else None


def decode_region(data: bytes, choose_box: Callable[[int, int], Box], size: int, interpolation: str) -> torch.Tensor:
    """choose_box(height, width)'s box resized to size x size, uint8 HWC; decoded at 1/2^k (k <= 3) where it shrinks."""
    dimensions = jpeg_dimensions(data)
    region = None
    if dimensions is not None:
        height, width = dimensions
        top, left, box_height, box_width = choose_box(height, width)
        shrink = min(box_height, box_width) / size
        scale = 8 if shrink >= 8 else 4 if shrink >= 4 else 2 if shrink >= 2 else 1
        with contextlib.suppress(ValueError):  # truncated or damaged: Pillow decides whether it can be read at all
            region = _decode_box(data, scale, height, width, top, left, box_height, box_width)
    if region is None:  # Pillow, at full size, as timm reads every file
        pixels = pil_to_hwc_uint8(load_rgb(data))
        top, left, box_height, box_width = choose_box(pixels.shape[0], pixels.shape[1])
        region = pixels[top:top + box_height, left:left + box_width]
    # As channels_last NCHW, torch's uint8 antialiased resize runs its fast kernel and returns HWC with no
    # transposing copy; it writes a new tensor, so the reused decode buffer is free for the next image.
    nchw = region.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    resized = torch.nn.functional.interpolate(nchw, size=(size, size), mode=interpolation, antialias=True)
    return resized[0].permute(1, 2, 0)


def _decode_box(data: bytes, scale: int, height: int, width: int, top: int, left: int, box_height: int,
                box_width: int) -> torch.Tensor:
    """The box (in full-size pixels) of the image decoded at 1/scale; all of it where jpeg_box is not built."""
    height, width = math.ceil(height / scale), math.ceil(width / scale)  # libjpeg's scaled size
    top, left = round(top / scale), round(left / scale)
    box_height = min(max(1, round(box_height / scale)), height - top)
    box_width = min(max(1, round(box_width / scale)), width - left)
    decoder = box_decoder()
    if decoder is not None:
        return torch.from_numpy(decoder.decode(data, scale, top, left, box_height, box_width, width))
    global _buffer
    if _buffer.size < height * width * 3:
        _buffer = np.empty(height * width * 3, dtype=np.uint8)
    pixels = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                                     buffer=_buffer, min_height=height, min_width=width))
    return pixels[top:top + box_height, left:left + box_width]


class FastRandomResizedCrop(ImageTransform):
    """RandomResizedCrop's crop distribution, then flip and (optionally) PIL-side steps such as RandAugment."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], interpolations: Sequence[str],
                 hflip: float, pil_steps: Callable[[Image.Image], Image.Image] = None):
        self.size, self.scale, self.ratio, self.hflip = size, list(scale), list(ratio), hflip
        self.interpolations = list(interpolations)  # 'bilinear'/'bicubic'; several: one per image (timm's 'random')
        self.pil_steps, self.uses_numpy_random = pil_steps, pil_steps is not None
        box_decoder()  # built (or its absence noted) once, here: loader workers forked later inherit it

    def _box(self, height: int, width: int) -> Box:
        # timm's get_params: torchvision's distribution, drawn with Python's random (~10 us, not ~80 us)
        return RandomResizedCropAndInterpolation.get_params(torch.empty(0, height, width), self.scale, self.ratio)

    def _interpolation(self) -> str:
        return self.interpolations[0] if len(self.interpolations) == 1 else random.choice(self.interpolations)

    def _flip(self) -> bool:
        return self.hflip > 0 and random.random() < self.hflip

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_region(data, self._box, self.size, self._interpolation())

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._flip():
            pixels = pixels.flip(1)
        if self.pil_steps is not None:
            pixels = pil_to_hwc_uint8(self.pil_steps(Image.fromarray(pixels.numpy())))
        return pixels


class FastCenterCrop(ImageTransform):
    """Short side to resize_to, centre crop img_size (torchvision's arithmetic), as one resize of the box."""

    def __init__(self, img_size: int, resize_to: int, interpolation: str):
        self.img_size, self.resize_to, self.interpolation = img_size, resize_to, interpolation
        box_decoder()  # as in FastRandomResizedCrop

    def _box(self, height: int, width: int) -> Box:
        if width <= height:
            new_width, new_height = self.resize_to, int(self.resize_to * height / width)
        else:
            new_width, new_height = int(self.resize_to * width / height), self.resize_to
        top = int(round((new_height - self.img_size) / 2.0)) * height / new_height
        left = int(round((new_width - self.img_size) / 2.0)) * width / new_width
        return (round(top), round(left), round(self.img_size * height / new_height),
                round(self.img_size * width / new_width))

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_region(data, self._box, self.img_size, self.interpolation)
