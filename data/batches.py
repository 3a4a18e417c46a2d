"""A batch as it leaves the loader workers, and how the workers stack it."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from .gpu_decode import EncodedBatch, EncodedImage


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

    # A worker's tensors cross through a shared-memory file each: labels and indices go as lists (docs/performance.md)
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
    return Batch(images, torch.tensor([s[1] for s in good], dtype=torch.long),
                 torch.tensor([s[2] for s in good], dtype=torch.long), unreadable)


class SharedBatchRing:
    """collate_batch into a ring of shared-memory buffers made once per worker (a fresh one page-faults per 4 KiB).
    Safe: a worker gets a task only as one of its batches is yielded, at most prefetch_factor in flight, so of
    prefetch_factor + 2 buffers one is refilled two yielded batches later: keep a batch longer only as a copy."""

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
