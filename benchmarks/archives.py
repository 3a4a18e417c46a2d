"""The training loader reading ImageNet as downloaded (the official train archive, Kaggle's
zip) against the same images in class folders and in tar shards; and how long the index of
each download takes to build.

    python -m benchmarks.archives --data-dir bench_imagenet --rounds 3

Writes --data-dir's train/ once as ILSVRC2012_img_train.tar (a tar of per-class tars) and as
Kaggle's zip (deflated members, as Kaggle serves them), and packs it into 16 tar shards,
all under --work-dir (default <data-dir>-downloads). Then, for 1 core (--workers 0) and for
2 loader workers in the same run, runs our training loader (fast decode, 256 px
random-resized crops, a random order) over each source in turn, --rounds times, and prints
a JSON line per pass and a last one with the medians and the index build times (per 1,000
images, from an empty cache). Everything reads through the page cache: the CPU cost of each
source, not a disk's or a network filesystem's.
"""
import io
import random
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from benchmarks.common import machine, print_result
from benchmarks.shards import OpenCounter, Source, benchmark_options, dataset, median, time_loader
from data.dataset import ImageDataset
from data.pack_shards import pack
from data.sample_index import cached
from data.sources.archives import TRAIN_ARCHIVE, scan_train
from data.sources.folders import find_classes, image_files
from data.sources.kaggle import PREFIX, scan_zip
from data.transforms import train_transform

SOURCES = ("folders", "shards", "archives", "kaggle-zip")
ZIP_NAME = "imagenet-object-localization-challenge.zip"


def tar_bytes(members: List[Tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_train_archive(train_dir: Path, path: Path, seed: int = 0) -> Path:
    """train/<wnid>/ as ILSVRC2012_img_train.tar: a tar of <wnid>.tar, classes and files
    shuffled (the archive's order is not the folders')."""
    rng = random.Random(seed)
    classes = find_classes(train_dir)
    with tarfile.open(path, "w") as outer:
        for wnid in rng.sample(classes, len(classes)):
            names = image_files(train_dir / wnid)
            inner = tar_bytes([(name, (train_dir / wnid / name).read_bytes())
                               for name in rng.sample(names, len(names))])
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(inner)
            outer.addfile(info, io.BytesIO(inner))
    return path


def write_zip(members: List[Tuple[str, Path]], path: Path) -> Path:
    """(name in the zip, file) as Kaggle zips them, deflated; every fifth member stored and
    every third with ZIP64 fields in its local header, which the reader must step over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for number, (name, file) in enumerate(members):
            info = zipfile.ZipInfo(name, date_time=(2017, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if number % 5 == 0 else zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=number % 3 == 0) as member:
                member.write(file.read_bytes())
    return path


def prepare(data_dir: Path, work: Path) -> Dict[str, Path]:
    """The train archive, the zip (train/ only) and the shards, each written once."""
    work.mkdir(parents=True, exist_ok=True)
    train = data_dir / "train"
    if not (work / TRAIN_ARCHIVE).is_file():
        write_train_archive(train, work / TRAIN_ARCHIVE)
    if not (work / ZIP_NAME).is_file():
        write_zip([(f"{PREFIX}train/{wnid}/{name}", train / wnid / name) for wnid in find_classes(train)
                   for name in image_files(train / wnid)], work / ZIP_NAME)
    pack(data_dir, work / "shards", name="bench", train_shards=16, splits=["train"])
    return {"archives": work / TRAIN_ARCHIVE, "kaggle-zip": work / ZIP_NAME, "shards": work / "shards"}


def timed_index(name: str, path: Path, build) -> Tuple:
    """The index, built and cached from an empty cache, and the seconds it took."""
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        index = cached(name, path.parent, f"bench-{name}.idx", name, lambda previous: (build(), name), cache)
        return index, time.perf_counter() - started


def sources(data_dir: Path, files: Dict[str, Path], img_size: int) -> Tuple[Dict[str, Source], Dict[str, float]]:
    """Each source's dataset, and the archives' index build times per 1,000 images."""
    transform = train_transform(img_size, decode="fast")
    classes = find_classes(data_dir / "train")
    archive, archive_s = timed_index("archives", files["archives"], lambda: scan_train(files["archives"], classes))
    zipped, zip_s = timed_index("zip", files["kaggle-zip"], lambda: scan_zip(files["kaggle-zip"], "train"))
    found = {"folders": dataset("folders", data_dir, files["shards"], img_size),
             "shards": dataset("shards", data_dir, files["shards"], img_size),
             "archives": Source("archives", ImageDataset(archive, classes, transform, seed=0), 1, (files["archives"],)),
             "kaggle-zip": Source("kaggle-zip", ImageDataset(zipped, classes, transform, seed=0), 1,
                                  (files["kaggle-zip"],))}
    per_thousand = {"archives": archive_s, "kaggle-zip": zip_s}
    return found, {name: round(seconds * 1000 / len(found["folders"].data), 3)
                   for name, seconds in per_thousand.items()}


def main() -> None:
    parser = benchmark_options(__doc__)
    parser.add_argument("--work-dir", type=Path, help="where the downloads are written (default <data-dir>-downloads)")
    args = parser.parse_args()
    files = prepare(args.data_dir, args.work_dir or args.data_dir.with_name(args.data_dir.name + "-downloads"))
    torch.set_num_threads(1)  # one core for the loader's own work; workers decode in their processes
    found, index_s = sources(args.data_dir, files, args.img_size)
    counter, summary = OpenCounter(), {}
    for workers in (0, 2):
        runs = {name: [] for name in SOURCES}
        for _ in range(args.rounds):
            for name in SOURCES:
                runs[name].append(time_loader(found[name], workers, counter, args.images, args.batch_size))
                print_result(runs[name][-1])
        summary[f"workers_{workers}"] = {name: median(runs[name])["images_per_s"] for name in SOURCES}
    print_result({"rounds": args.rounds, "images": len(found["folders"].data), "images_per_s": summary,
                  "index_seconds_per_1000_images": index_s, **machine()})


if __name__ == "__main__":
    main()
