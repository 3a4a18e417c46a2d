"""JPEG decoding on the GPU, for boxes with few CPU cores: workers only read files, draw crops (docs/performance.md)."""
import contextlib
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import simplejpeg
import torch

from .fast_decode import DECODE_ERRORS, Box, FastRandomResizedCrop, decode_region, jpeg_dimensions

try:  # pinned in requirements.txt; a machine with another torch may lack a TorchCodec that loads
    from torchcodec.decoders import decode_jpeg
except (ImportError, OSError, RuntimeError) as exc:
    decode_jpeg, WHY_NO_TORCHCODEC = None, f"TorchCodec cannot be imported ({exc})"


@dataclass
class EncodedImage:
    """One training image on its way to the GPU: JPEG bytes and what to do with them, or pixels."""

    data: Optional[bytes]  # the file, or None
    pixels: Optional[torch.Tensor]  # uint8 HWC, already cropped and resized, or None
    box: Box
    flip: bool
    interpolation: str
    size: int  # output side


@dataclass
class EncodedBatch:
    """A batch's JPEGs back to back in one tensor: one per image cost 0.39 ms an image (benchmarks.handover)."""

    images: List[EncodedImage]  # their `data` moved into `files`
    files: torch.Tensor  # uint8, every file's bytes in order
    lengths: List[int]  # bytes of each image's file, 0 for one that travels as pixels

    @classmethod
    def pack(cls, images: List[EncodedImage]) -> "EncodedBatch":
        joined = bytearray(b"".join(image.data or b"" for image in images))
        files = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        return cls([replace(image, data=None) for image in images], files, [len(image.data or b"") for image in images])

    def pin_memory(self) -> "EncodedBatch":
        return self


class EncodedRandomResizedCrop(FastRandomResizedCrop):
    """The worker half of GPU decoding: the crop, flip and interpolation, drawn as FastRandomResizedCrop draws them."""

    def decode(self, data: bytes) -> EncodedImage:
        interpolation, dimensions = self._interpolation(), jpeg_dimensions(data)
        if dimensions is not None:
            return EncodedImage(data, None, self._box(*dimensions), self._flip(), interpolation, self.size)
        pixels = decode_region(data, self._box, self.size, interpolation)
        return EncodedImage(None, pixels, (0, 0, self.size, self.size), self._flip(), interpolation, self.size)

    def finish(self, encoded: EncodedImage) -> EncodedImage:
        return encoded


def decode_batch(batch: EncodedBatch, device: torch.device) -> Tuple[torch.Tensor, Dict[int, str]]:
    """uint8 NHWC on `device` of the images that decode, and {position: why} of the others. One the device
    refuses is decoded as the fast CPU path decodes it, so that the two paths skip the same files."""
    size = batch.images[0].size
    out = torch.empty(len(batch.images), 3, size, size, dtype=torch.uint8, device=device)
    files = {i: file for i, file in enumerate(batch.files.split(batch.lengths)) if batch.lengths[i]}
    try:
        decoded = dict(zip(files, decode_jpeg(list(files.values()), mode="RGB", device=device))) if files else {}
    except RuntimeError:  # one truncated file fails a batch call: each goes alone
        decoded = {}
        for i, file in files.items():
            with contextlib.suppress(RuntimeError):
                decoded[i] = decode_jpeg([file], mode="RGB", device=device)[0]
    failed = {}
    for position, image in enumerate(batch.images):
        if position in decoded:
            top, left, height, width = image.box
            # In float: CUDA has no antialiased uint8 resize (torch 2.11); rounded, it is within one level of the CPU's
            region = decoded[position][:, top:top + height, left:left + width].unsqueeze(0).float()
            resized = torch.nn.functional.interpolate(region, (size, size), mode=image.interpolation, antialias=True)
            chw = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        else:
            pixels = image.pixels
            if pixels is None:
                try:
                    pixels = decode_region(bytes(files[position].numpy()), lambda h, w: image.box, size,
                                           image.interpolation)
                except DECODE_ERRORS as exc:
                    failed[position] = f"{type(exc).__name__}: {exc}"
                    continue
            chw = pixels.permute(2, 0, 1).to(device, non_blocking=True)
        out[position] = chw.flip(-1) if image.flip else chw
    kept = [position for position in range(len(batch.images)) if position not in failed]
    return (out[kept] if failed else out).permute(0, 2, 3, 1), failed


def gpu_decode_available(device: torch.device) -> Tuple[bool, str]:
    """Whether nvJPEG decodes here; if not, the reason, for the fallback message."""
    if decode_jpeg is None:
        return False, WHY_NO_TORCHCODEC
    if device.type != "cuda":
        return False, "no CUDA GPU"
    try:
        jpeg = simplejpeg.encode_jpeg(np.zeros((16, 16, 3), dtype=np.uint8))
        decode_jpeg([torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)], device=device)
    except (RuntimeError, OSError, ValueError) as exc:  # no nvJPEG, or no CUDA build of TorchCodec
        return False, f"TorchCodec cannot decode JPEG on {device} ({exc})"
    return True, ""
