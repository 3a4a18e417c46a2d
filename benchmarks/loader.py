"""Loader-only throughput: ours against timm's, on any ImageNet-layout folder.

    python -m benchmarks.loader --data-dir DIR --split train --workers 0 --pipeline ours
    python -m benchmarks.loader --data-dir DIR --split train --workers 0 --pipeline timm

Both produce what reaches the GPU: uint8 batches, normalised later on the device (timm's
prefetcher path, which its train.py uses on GPUs). Same augmentation on both sides:
random-resized crop 0.08-1 / 3:4-4:3, bilinear, flip, no colour jitter; for val, the
256 px / 0.887 / bilinear evaluation transform. --workers 0 measures one core; the final
line is JSON with images_per_s (and images_per_s_per_core). Ours decodes only each crop's
box (data/jpeg_box.py) where it can; --whole-jpeg times whole-file decoding instead, and
the `jpeg` field says which ran.
"""
import argparse
import os
import time
from pathlib import Path

import torch
from timm.data import ImageDataset, create_transform
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader

from benchmarks.common import print_result
from data.dataset import ImageDataset as OurDataset
from data.sources.folders import find_classes, index_split
from data.jpeg_box import SWITCH, box_decoder
from data.loaders import PREFETCH_FACTOR, loader_options
from data.transforms import eval_transform, train_transform


def build(pipeline: str, folder: Path, split: str, img_size: int, decode: str, workers: int):
    """(dataset, DataLoader options) for one pipeline: each as its training script loads."""
    if pipeline == "timm":
        transform = create_transform(img_size, is_training=split == "train", use_prefetcher=True, color_jitter=None,
                                     interpolation="bilinear", crop_pct=0.887)
        options = dict(num_workers=workers, collate_fn=fast_collate, prefetch_factor=PREFETCH_FACTOR if workers else None)
        return ImageDataset(str(folder), transform=transform), options
    classes = find_classes(folder)
    transform = train_transform(img_size, decode=decode) if split == "train" else \
        eval_transform(img_size, 0.887, decode=decode)
    return OurDataset(index_split(folder, classes), classes, transform, seed=0), loader_options(workers, False)


def measure(pipeline: str, data_dir: Path, split: str, workers: int, img_size: int = 256, batch_size: int = 64,
            max_images: int = 0, decode: str = "", whole_jpeg: bool = False) -> dict:
    decode = decode or ("fast" if split == "train" else "full")
    if whole_jpeg:
        os.environ[SWITCH] = "0"  # before the first box_decoder() call, and inherited by the workers
    if workers == 0:
        torch.set_num_threads(1)  # one core, all of it in this process
    dataset, options = build(pipeline, Path(data_dir) / split, split, img_size, decode, workers)
    count = len(dataset) if not max_images else min(max_images, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=batch_size, **options)
    iterator = iter(loader)
    first = next(iterator)  # worker start-up and the first batch are not throughput
    seen, start = 0, time.perf_counter()
    for batch in iterator:
        seen += len(batch[1]) if pipeline == "timm" else len(batch.targets)
    seconds = time.perf_counter() - start
    del first
    fast = pipeline == "ours" and decode == "fast"
    return {"pipeline": pipeline, "split": split, "workers": workers, "decode": decode if pipeline == "ours" else "pillow",
            "jpeg": ("box" if box_decoder() else "whole") if fast else "", "images": seen, "seconds": round(seconds, 3),
            "images_per_s": round(seen / seconds, 1), "images_per_s_per_core": round(seen / seconds / max(workers, 1), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--workers", type=int, default=0, help="0: in this process, one core")
    parser.add_argument("--pipeline", choices=["ours", "timm"], default="ours")
    parser.add_argument("--decode", choices=["fast", "full", "gpu"],
                        help="ours only (default: fast for train, full for val); gpu (train): the workers' half only, "
                             "reading the files and drawing the crops; the decoding itself runs on the GPU when training")
    parser.add_argument("--whole-jpeg", action="store_true",
                        help="ours, --decode fast: decode whole files, not only the crops' boxes (to compare)")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=0, help="at most this many (default: all)")
    args = parser.parse_args()
    print_result(measure(args.pipeline, args.data_dir, args.split, args.workers, args.img_size, args.batch_size,
                         args.images, args.decode or "", args.whole_jpeg))


if __name__ == "__main__":
    main()
