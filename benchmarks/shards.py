"""The training loader from tar shards against the same images from class folders: images
per second, and files opened and read calls per image.

    python -m benchmarks.shards --data-dir bench_imagenet --workers 0 --rounds 5
    python -m benchmarks.shards --data-dir bench_imagenet --workers 2 --rounds 5

Packs --data-dir's train/ into --shards-dir (default <data-dir>-shards, 16 shards; once:
a second run finds them) with data/pack_shards.py, then runs our training loader (fast
decode, 256 px random-resized crops, the recipe's DataLoader options, samples in a random
order as the sampler serves them) over the folders and the shards alternately, --rounds
times, and prints a JSON line per run and a last one with the medians.

opens: open() calls on the dataset's files by every process (the training process and its
loader workers), counted with a Python audit hook (it sees open() and os.open(), which is
how both datasets open files). read_calls: read system calls per image (/proc/self/io's
syscr), only with --workers 0, where all of them happen in this process. Both paths read
through the page cache here: this measures the CPU cost of each layout, not a network
filesystem's latency per open, which is what shards avoid.
"""
import argparse
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.common import machine, print_result
from data.dataset import ImageDataset
from data.loaders import loader_options
from data.pack_shards import pack
from data.sources.folders import find_classes, index_split
from data.sources.tars import shard_index
from data.transforms import train_transform

SOURCES = ("folders", "shards")


class OpenCounter:
    """Counts open() calls on files under `roots`, in this process and in every process it
    forks afterwards (a DataLoader's workers): an audit hook, which a forked child keeps,
    adds to a counter in shared memory."""

    def __init__(self):
        self.roots: tuple = ()
        self.count = multiprocessing.Value("q", 0)
        sys.addaudithook(self._hook)  # cannot be removed; it costs a tuple check when idle

    def _hook(self, event: str, args) -> None:
        if event == "open" and self.roots and isinstance(args[0], str) and args[0].startswith(self.roots):
            with self.count.get_lock():
                self.count.value += 1

    def start(self, *roots: Path) -> None:
        self.roots = tuple(str(root.resolve()) for root in roots)
        self.count.value = 0

    def stop(self) -> int:
        self.roots = ()
        return self.count.value


def read_calls() -> int:
    with open("/proc/self/io") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("syscr"))


@dataclass
class Source:
    """A training set to time: its dataset, how many files it reads, and where they lie."""

    name: str
    data: ImageDataset
    files: int
    roots: Tuple[Path, ...]


def dataset(source: str, data_dir: Path, shards_dir: Path, img_size: int) -> Source:
    transform = train_transform(img_size, decode="fast")
    if source == "shards":
        shards = shard_index(shards_dir, "train")
        return Source(source, ImageDataset(shards, [], transform, seed=0), len(shards.folders), (shards_dir,))
    samples = index_split(data_dir / "train", find_classes(data_dir / "train"))
    return Source(source, ImageDataset(samples, [], transform, seed=0), len(samples), (data_dir,))


def measure(source: str, data_dir: Path, shards_dir: Path, workers: int, counter: OpenCounter, images: int = 0,
            batch_size: int = 64, img_size: int = 256) -> Dict:
    return time_loader(dataset(source, data_dir, shards_dir, img_size), workers, counter, images, batch_size)


def time_loader(source: Source, workers: int, counter: OpenCounter, images: int = 0, batch_size: int = 64) -> Dict:
    """One pass of the loader over `images` samples in a random order; the first batch
    (worker start-up) is left out of the rate but not out of the counts."""
    data = source.data
    count = len(data) if not images else min(images, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count].tolist()
    loader = DataLoader(Subset(data, order), batch_size=batch_size, **loader_options(workers, False))
    counter.start(*source.roots)
    calls = read_calls()
    iterator = iter(loader)
    seen = len(next(iterator).targets)
    start, timed = time.perf_counter(), 0
    for batch in iterator:
        timed += len(batch.targets)
    seconds = time.perf_counter() - start
    calls, opens = read_calls() - calls, counter.stop()
    del iterator, loader
    seen += timed
    return {"source": source.name, "workers": workers, "images": seen, "files": source.files,
            "seconds": round(seconds, 3), "images_per_s": round(timed / seconds, 1), "opens": opens,
            "opens_per_image": round(opens / seen, 4),
            "read_calls_per_image": round(calls / seen, 2) if workers == 0 else None}


def median(runs: List[Dict]) -> Dict:
    return sorted(runs, key=lambda run: run["images_per_s"])[len(runs) // 2]


def benchmark_options(doc: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that time the training loader over several sources."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="an ImageNet-layout folder (its train/ is used)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over each source; the median is reported")
    parser.add_argument("--images", type=int, default=0, help="at most this many a pass (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=256)
    return parser


def main() -> None:
    parser = benchmark_options(__doc__)
    parser.add_argument("--shards-dir", type=Path, help="where its shards are (default: <data-dir>-shards)")
    parser.add_argument("--shards", type=int, default=16, help="shards to pack it into (default 16)")
    parser.add_argument("--workers", type=int, default=0, help="0: in this process, one core")
    args = parser.parse_args()
    shards_dir = args.shards_dir or args.data_dir.with_name(args.data_dir.name + "-shards")
    pack(args.data_dir, shards_dir, name="bench", train_shards=args.shards, splits=["train"])
    if args.workers == 0:
        torch.set_num_threads(1)  # one core, all of it in this process
    counter = OpenCounter()
    runs = {source: [] for source in SOURCES}
    for _ in range(args.rounds):
        for source in SOURCES:
            runs[source].append(measure(source, args.data_dir, shards_dir, args.workers, counter, args.images,
                                        args.batch_size, args.img_size))
            print_result(runs[source][-1])
    folders, shards = median(runs["folders"]), median(runs["shards"])
    print_result({"workers": args.workers, "rounds": args.rounds, "images": shards["images"],
                  "folders_images_per_s": folders["images_per_s"], "shards_images_per_s": shards["images_per_s"],
                  "shards_over_folders": round(shards["images_per_s"] / folders["images_per_s"], 3),
                  "folders_opens_per_image": folders["opens_per_image"], "shards_opens": shards["opens"],
                  "shards": shards["files"], "shards_opens_per_image": shards["opens_per_image"],
                  "folders_read_calls_per_image": folders["read_calls_per_image"],
                  "shards_read_calls_per_image": shards["read_calls_per_image"], **machine()})


if __name__ == "__main__":
    main()
