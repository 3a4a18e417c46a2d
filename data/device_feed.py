"""Training batches copied to the GPU one step ahead, on a CUDA stream of their own
(runtime.copy_stream).

A pinned batch copied with non_blocking=True on the default stream does not block the host,
but the GPU runs it in that stream's order: after the step queued before it, before the one
after. On a side stream the copy of the next batch runs while this step computes.

The training process then holds one batch more than without it: the next one. The
shared-memory ring allows that (data/batches.py: a worker's buffer is refilled only after two
more of that worker's batches have been yielded, and the batch before the one in hand is no
longer read by then; with pin_memory the batch has left the ring anyway). On the CPU the
same look-ahead runs, with a copy that is no copy, which is how it is tested there.
"""
import contextlib
from typing import Iterable, Iterator, Optional

import torch

from .batches import Batch
from .gpu_decode import EncodedBatch, decode_batch


def ahead_on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches`, in order, each with its images and targets already on `device`."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ahead: Optional[Batch] = None
    for batch in batches:
        moved = copied(batch, device, stream)
        if ahead is not None:
            yield ready(ahead, stream)
        ahead = moved
    if ahead is not None:
        yield ready(ahead, stream)


def copied(batch: Batch, device: torch.device, stream: Optional["torch.cuda.Stream"]) -> Batch:
    """The copy queued on `stream`; JPEGs for the GPU decoder stay on the host (they are
    decoded on the default stream)."""
    if not isinstance(batch.images, torch.Tensor):
        return batch
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return Batch(batch.images.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True),
                     batch.indices, batch.unreadable)


def ready(batch: Batch, stream: Optional["torch.cuda.Stream"]) -> Batch:
    """Make the default stream wait for the batch's copy, and keep its memory from being
    reused by the side stream's allocator until the default stream is done with it."""
    if stream is not None and isinstance(batch.images, torch.Tensor):
        current = torch.cuda.current_stream(stream.device)
        current.wait_stream(stream)
        batch.images.record_stream(current)
        batch.targets.record_stream(current)
    return batch


def decoded_on(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches` of JPEGs (data.train_decode=gpu) decoded on `device`; an image that decodes
    nowhere leaves its batch and is listed unreadable, as a loader worker lists one."""
    for batch in batches:
        if isinstance(batch.images, EncodedBatch):
            images, failed = decode_batch(batch.images, device)
            kept = [position for position in range(len(batch.targets)) if position not in failed]
            batch = Batch(images, batch.targets[kept], batch.indices[kept],
                          batch.unreadable + [(int(batch.indices[p]), why) for p, why in sorted(failed.items())])
        yield batch
