"""What a start costs at ImageNet's size: the index of a class-folder tree, against
torchvision's ImageFolder and timm's create_dataset listing the same tree, in one run.

    python -m benchmarks.index --root /tmp/index_bench --files 100000 1281000

Builds (once; a later run finds them) trees of 1,000 class folders holding the given
numbers of train files, hard links to a few real JPEGs (ext4 allows 65,000 links to a file,
so each source file takes 60,000), and a val/ of 10 per class. Prints a JSON line per tree:

- build_s: our first start's index (listing and cache file; the cache is removed first),
  and imagefolder_s / timm_s: their listing of the same tree;
- load_s: our second start's index, read from its cache, with the check that no folder changed;
- index_mb: the cache file's size;
- worker_growth_mb: the private (dirty) memory that a forked worker gains reading every sample's
  path and class once, as a loader worker does over an epoch, for each of the three;
- first_step_s (first start) and first_step_cached_s (a second start into a new run folder):
  from launching `python train.py` (a tiny recipe) to its first step's line; and the same on
  a tree of 20 files per class, the size where the index costs nothing (--first-step only).
"""
import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

from benchmarks.common import machine, print_result
from data.sources.folders import cached_index, find_classes
from data.sample_data import generate
from data.sample_index import cache_file

LINKS_PER_FILE = 60_000  # under ext4's 65,000 hard links to one inode


def make_tree(root: Path, classes: int, per_class: int, source: Path) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (10 each), hard links to copies
    of `source`; kept for a later run."""
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "sources").mkdir(parents=True)
    made = 0
    for split, count in (("train", per_class), ("val", 10)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                original = root / "sources" / f"{made // LINKS_PER_FILE}.JPEG"
                if made % LINKS_PER_FILE == 0:
                    shutil.copy(source, original)
                os.link(original, folder / f"n{c:08d}_{i}.JPEG")
                made += 1
    (root / "done").write_text(f"{made}\n")
    return root


def settle(tree: Path) -> None:
    """Date every folder an hour back, as a dataset copied before the job: a folder changed
    within two seconds of its listing is not trusted, and would be listed again."""
    when = time.time() - 3600
    for folder in [tree / split for split in ("train", "val")] + list((tree / "train").iterdir()) + \
            list((tree / "val").iterdir()):
        os.utime(folder, (when, when))


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, round(time.perf_counter() - started, 3)


def private_bytes() -> int:
    """Pages this process wrote for itself (copies of shared pages included): a mapped
    file's pages are the page cache's, one copy for every process that maps it."""
    with open("/proc/self/smaps_rollup") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Private_Dirty"))


def read_every_sample(samples, queue) -> None:
    before = private_bytes()
    for index in range(len(samples)):
        path, target = samples[index]
    queue.put(private_bytes() - before)


def worker_growth_mb(samples) -> float:
    """What a forked worker gains by reading every sample once."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=read_every_sample, args=(samples, queue))
    worker.start()
    grown = queue.get(timeout=600)
    worker.join(timeout=60)
    return round(grown / 2**20, 1)


def first_step_s(tree: Path, output: Path) -> float:
    """Launching train.py to its first step's line, on one thread, without loader workers."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "train.py", "--recipe", "demo.yaml", "--data-dir", str(tree), "--output", str(output),
               "model.num_classes=auto", "batch_size=8", "data.img_size=32", "data.eval_img_size=32",
               "data.workers=0", "runtime.log_interval=1", "epochs=1", "schedule.burn_in_iters=2"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in process.stdout:
        if line.startswith("step 1 "):
            took = time.perf_counter() - started
            process.kill()
            process.wait()
            return round(took, 2)
    raise RuntimeError(f"{' '.join(command)} ended before its first step")


def measure(tree: Path) -> Dict:
    from timm.data import create_dataset
    from torchvision.datasets import ImageFolder

    settle(tree)
    train = tree / "train"
    classes = find_classes(train)
    cache = cache_file(tree, "train.idx")
    cache.unlink(missing_ok=True)
    ours, build_s = timed(lambda: cached_index(train, classes))
    again, load_s = timed(lambda: cached_index(train, classes))
    os.sync()  # the cache file's pages, just written, stay dirty until written back: not a copy of a worker's
    folder, imagefolder_s = timed(lambda: ImageFolder(str(train)))
    theirs, timm_s = timed(lambda: create_dataset("", root=str(train)))
    return dict(files=len(ours), build_s=build_s, imagefolder_s=imagefolder_s, timm_s=timm_s, load_s=load_s,
                index_mb=round(cache.stat().st_size / 2**20, 1), worker_growth_mb=worker_growth_mb(again),
                imagefolder_worker_growth_mb=worker_growth_mb(folder.samples),
                timm_worker_growth_mb=worker_growth_mb(theirs.reader.samples))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/index_bench"), help="where the trees are built")
    parser.add_argument("--files", type=int, nargs="+", default=[100_000, 1_281_000], help="train files per tree")
    parser.add_argument("--classes", type=int, default=1000, help="class folders per tree")
    parser.add_argument("--first-step", action="store_true", help="also time train.py to its first step")
    args = parser.parse_args(argv)
    source = args.root / "sample"
    if not (source / "train").is_dir():
        generate(source, num_classes=1, train_per_class=1, val_per_class=1, min_size=300, max_size=500, seed=0)
    jpeg = next((source / "train").glob("*/*.JPEG"))
    print_result(dict(machine(), benchmark="index"))
    small = make_tree(args.root / "tree-small", args.classes, 20, jpeg) if args.first_step else None
    for files in args.files:
        tree = make_tree(args.root / f"tree-{args.classes}x{files // args.classes}", args.classes, files // args.classes,
                         jpeg)
        result = measure(tree)
        if args.first_step:
            cache_file(tree, "train.idx").unlink(missing_ok=True)
            result.update(first_step_s=first_step_s(tree, args.root / "run-a"),
                          first_step_cached_s=first_step_s(tree, args.root / "run-b"),
                          first_step_20_per_class_s=first_step_s(small, args.root / "run-c"))
        print_result(result)


if __name__ == "__main__":
    main()
