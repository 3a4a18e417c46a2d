"""The fast CPU path: decode with libjpeg-turbo only the box that the crop keeps (jpeg_box;
simplejpeg's whole-file decode, about 1.4x Pillow's here, where jpeg_box cannot be built),
at 1/2, 1/4 or 1/8 size in the DCT domain when the crop will be shrunk at least that much
anyway, then crop and resize in one antialiased step on the uint8 tensor.

The crop geometry is drawn from RandomResizedCrop's distribution (timm's sampler); the pixels
differ slightly from a full Pillow decode and resize (libjpeg-turbo's fast IDCT and
upsampling, torch's resize kernel). Files libjpeg-turbo does not read as RGB JPEG (PNG
behind a .JPEG name, CMYK) go through Pillow, as timm's path does.
"""
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
# What a file that cannot be decoded raises: Pillow's UnidentifiedImageError and "image
# file is truncated" are OSErrors; broken headers raise SyntaxError or ValueError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageTransform:
    """Two stages, so that the dataset can tell a broken file from a broken transform:
    `decode` decodes the file's bytes (and fails on a bad one), `finish` only computes.
    Bytes, not a path: the dataset reads them, from a file or from inside an archive
    (data/dataset.py), and the pixels do not depend on where they came from."""

    # Whether a step draws from NumPy's global generator (timm's RandAugment picks its ops
    # with np.random.choice). Only then does the dataset seed it per sample: saving and
    # restoring NumPy's state in the main process costs ~70 us an image.
    uses_numpy_random = False

    def decode(self, data: bytes):
        raise NotImplementedError

    def finish(self, decoded) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.finish(self.decode(data))

    def at(self, epoch: int) -> "ImageTransform":
        """The transform of a sample of `epoch`: this one, unless the crop size changes with
        the epoch (transforms.SizeByEpoch)."""
        return self


_buffer = np.empty(0, dtype=np.uint8)  # reused decode target: a fresh 0.5 MB array a call costs page faults


def _decode_buffer(size: int) -> np.ndarray:
    global _buffer
    if _buffer.size < size:
        _buffer = np.empty(size, dtype=np.uint8)
    return _buffer


def load_rgb(data: bytes) -> Image.Image:
    """Pillow's full decode, to RGB whatever the stored mode (ImageNet has grayscale and
    CMYK JPEGs, and a PNG behind a .JPEG name): timm's way of reading a file. Pillow reads
    bytes and a file alike, so these are timm's pixels exactly."""
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
    """(height, width) if libjpeg-turbo (and nvJPEG) can decode these bytes to RGB; None for
    anything else (a PNG behind a .JPEG name, a CMYK JPEG): Pillow's job."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in ("YCbCr", "Gray", "RGB") else None


def decode_region(data: bytes, choose_box: Callable[[int, int], Box], size: int, interpolation: str) -> torch.Tensor:
    """Decode the image, take the box that choose_box(height, width) picks, resize it to
    size x size; uint8 HWC. The JPEG is decoded at 1/2^k scale when the box is at least
    2^k times the output in both directions (k <= 3)."""
    dimensions = jpeg_dimensions(data)
    region = None
    if dimensions is not None:
        height, width = dimensions
        top, left, box_height, box_width = choose_box(height, width)
        shrink = min(box_height, box_width) / size
        scale = 8 if shrink >= 8 else 4 if shrink >= 4 else 2 if shrink >= 2 else 1
        try:
            region = _decode_box(data, scale, height, width, top, left, box_height, box_width)
        except ValueError:
            pass  # truncated or damaged: Pillow decides whether it can be read at all
    if region is None:  # Pillow, at full size, as timm reads every file
        pixels = pil_to_hwc_uint8(load_rgb(data))
        top, left, box_height, box_width = choose_box(pixels.shape[0], pixels.shape[1])
        region = pixels[top:top + box_height, left:left + box_width]
    # As a channels_last NCHW batch of one, torch's uint8 antialiased resize runs its fast
    # kernel and returns channels_last too: HWC with no transposing copy. interpolate always
    # writes a new tensor, so the reused decode buffer is free for the next image.
    nchw = region.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    resized = torch.nn.functional.interpolate(nchw, size=(size, size), mode=interpolation, antialias=True)
    return resized[0].permute(1, 2, 0)


def _decode_box(data: bytes, scale: int, height: int, width: int, top: int, left: int, box_height: int,
                box_width: int) -> torch.Tensor:
    """The box (in full-size pixels) of the image decoded at 1/scale: only the box where
    jpeg_box is built, else the whole image (simplejpeg) and a view of the box."""
    height, width = math.ceil(height / scale), math.ceil(width / scale)  # libjpeg's scaled size
    top, left = round(top / scale), round(left / scale)
    box_height = min(max(1, round(box_height / scale)), height - top)
    box_width = min(max(1, round(box_width / scale)), width - left)
    decoder = box_decoder()
    if decoder is not None:
        return torch.from_numpy(decoder.decode(data, scale, top, left, box_height, box_width, width))
    pixels = torch.from_numpy(simplejpeg.decode_jpeg(
        data, colorspace="RGB", fastdct=True, fastupsample=True, buffer=_decode_buffer(height * width * 3),
        min_height=height, min_width=width))
    return pixels[top:top + box_height, left:left + box_width]


class FastRandomResizedCrop(ImageTransform):
    """RandomResizedCrop's crop distribution, then flip and (optionally) PIL-side steps such
    as RandAugment."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float],
                 interpolations: Sequence[str], hflip: float,
                 pil_steps: Callable[[Image.Image], Image.Image] = None):
        self.size = size
        self.scale = list(scale)
        self.ratio = list(ratio)
        self.interpolations = list(interpolations)  # 'bilinear'/'bicubic'; several: one per image (timm's 'random')
        self.hflip = hflip
        self.pil_steps = pil_steps
        self.uses_numpy_random = pil_steps is not None
        box_decoder()  # built (or its absence noted) once, here: loader workers forked later inherit it

    def _box(self, height: int, width: int) -> Box:
        # timm's get_params: torchvision's distribution, drawn with Python's random (~10 us
        # against ~80 us for torchvision's scalar tensor ops).
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
    """The evaluation crop (short side to resize_to, centre crop img_size) as one resize of
    the region that the crop keeps; torchvision's Resize/CenterCrop arithmetic."""

    def __init__(self, img_size: int, resize_to: int, interpolation: str):
        self.img_size = img_size
        self.resize_to = resize_to
        self.interpolation = interpolation
        box_decoder()  # as in FastRandomResizedCrop

    def _box(self, height: int, width: int) -> Box:
        if width <= height:
            new_width, new_height = self.resize_to, int(self.resize_to * height / width)
        else:
            new_width, new_height = int(self.resize_to * width / height), self.resize_to
        top = int(round((new_height - self.img_size) / 2.0)) * height / new_height
        left = int(round((new_width - self.img_size) / 2.0)) * width / new_width
        return round(top), round(left), round(self.img_size * height / new_height), round(self.img_size * width / new_width)

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_region(data, self._box, self.img_size, self.interpolation)

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels
