"""What it costs to hand a batch from a loader worker to the training process: the worker's
time to stack it, and the training process's time (wall and CPU) to receive it.

    python -m benchmarks.handover --way ours|label_tensors|fresh|per_image --batch-size 128 --img-size 256

The ways, all with ready-made images so that only the hand-over is timed:
- ours: stacked into the worker's reused shared buffers, labels and indices as lists;
- label_tensors: the same, with labels and indices as two tensors;
- fresh: torch's default_collate, which stacks into fresh shared memory for every batch;
- per_image: one tensor per image (how GPU-decode batches travelled before they were packed).
The final line is JSON with worker_ms, main_wall_ms and main_cpu_ms per batch (medians).
"""
import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from benchmarks.common import print_result
from data.batches import SharedBatchRing
from data.loaders import PREFETCH_FACTOR

WORKERS = 2


class ReadyImages(Dataset):
    def __init__(self, img_size: int):
        self.image = torch.full((img_size, img_size, 3), 7, dtype=torch.uint8)

    def __len__(self) -> int:
        return 10 ** 9

    def __getitem__(self, index: int):
        return self.image, 0, index, None  # what ImageFolderDataset returns


def fresh(samples):
    return default_collate([(image, target) for image, target, _, _ in samples])


class LabelTensors(SharedBatchRing):
    def __call__(self, samples):
        batch = super().__call__(samples)
        return batch.images, batch.targets, batch.indices


def per_image(samples):
    return [image.clone() for image, _, _, _ in samples]


class Timed:
    """The collate function's result and its time in the worker."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        start = time.process_time()
        result = self.collate(samples)
        return result, time.process_time() - start


def measure(collate, batch_size: int, img_size: int, repeats: int, settle_s: float) -> dict:
    loader = DataLoader(ReadyImages(img_size), batch_size=batch_size, num_workers=WORKERS, collate_fn=Timed(collate),
                        prefetch_factor=PREFETCH_FACTOR, persistent_workers=True)
    batches = iter(loader)
    for _ in range(3 * WORKERS * PREFETCH_FACTOR):  # past the rings' first allocations
        next(batches)
    in_flight = WORKERS * PREFETCH_FACTOR
    worker, wall, cpu = [], [], []
    for _ in range(repeats):
        time.sleep(settle_s)  # the workers fill every slot, so that receiving is all that is timed
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(in_flight):
            _, seconds = next(batches)
            worker.append(seconds)
        wall.append((time.perf_counter() - start_wall) / in_flight)
        cpu.append((time.process_time() - start_cpu) / in_flight)
    return {"worker_ms": round(statistics.median(worker) * 1e3, 2),
            "main_wall_ms": round(statistics.median(wall) * 1e3, 2),
            "main_cpu_ms": round(statistics.median(cpu) * 1e3, 2)}


WAYS = {"ours": lambda: SharedBatchRing(PREFETCH_FACTOR), "label_tensors": lambda: LabelTensors(PREFETCH_FACTOR),
        "fresh": lambda: fresh, "per_image": lambda: per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--way", choices=list(WAYS), default="ours")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--settle-s", type=float, default=1.5)
    args = parser.parse_args()
    result = {"way": args.way, "batch_size": args.batch_size, "img_size": args.img_size, "workers": WORKERS}
    result.update(measure(WAYS[args.way](), args.batch_size, args.img_size, args.repeats, args.settle_s))
    print_result(result)


if __name__ == "__main__":
    main()
