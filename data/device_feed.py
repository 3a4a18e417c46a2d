"""Batches copied to the GPU a step ahead on a stream of their own (runtime.copy_stream): on the default stream the
copy would wait for the step queued before it. Holding one batch more fits the ring's slack (data/batches.py)."""
import contextlib
from typing import Iterable, Iterator, Optional

import torch

from .batches import Batch
from .gpu_decode import EncodedBatch, decode_batch


def ahead_on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ahead: Optional[Batch] = None
    for batch in batches:
        if isinstance(batch.images, torch.Tensor):  # queued on `stream`; JPEGs for the GPU decoder stay on the host
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                batch = Batch(batch.images.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True),
                              batch.indices, batch.unreadable)
        if ahead is not None:
            yield ready(ahead, stream)
        ahead = batch
    if ahead is not None:
        yield ready(ahead, stream)


def ready(batch: Batch, stream: Optional["torch.cuda.Stream"]) -> Batch:
    """The default stream waits for the batch's copy, and the side stream's allocator keeps its memory until then."""
    if stream is not None and isinstance(batch.images, torch.Tensor):
        current = torch.cuda.current_stream(stream.device)
        current.wait_stream(stream)
        batch.images.record_stream(current)
        batch.targets.record_stream(current)
    return batch


def decoded_on(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches` of JPEGs decoded on `device`; one that decodes nowhere is listed unreadable, as a worker would."""
    for batch in batches:
        if isinstance(batch.images, EncodedBatch):
            images, failed = decode_batch(batch.images, device)
            kept = [position for position in range(len(batch.targets)) if position not in failed]
            batch = Batch(images, batch.targets[kept], batch.indices[kept],
                          batch.unreadable + [(int(batch.indices[p]), why) for p, why in sorted(failed.items())])
        yield batch
