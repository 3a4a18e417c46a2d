"""Commands on ImageNet as downloaded (the official archives, Kaggle's zip or its tree: docs/archives.md).

    python -m data.downloads verify DIR                                the archives' MD5s against the published ones
    python -m data.downloads arrange --data-dir DIR --out OUT          class folders OUT/{train,val}/<wnid>/
    python -m data.downloads arrange --val-dir FLAT --devkit D --out OUT/val     a flat val folder, linked
"""
import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Dict, Tuple

from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE

from common.errors import DatasetLayoutError
from common.files import write_atomically
from common.progress import progress

from .config import DataConfig
from .dataset import ImageDataset
from .fast_decode import DECODE_ERRORS
from .loaders import build_splits
from .sample_index import absolute
from .sources import download_of, kaggle
from .sources.folders import image_files
from .sources.labels import DEVKIT_ARCHIVE, KAGGLE_SOLUTION, labels_from


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in progress(iter(lambda: handle.read(1 << 24), b""), f"hashing {path.name}", path.stat().st_size,
                              "B", size=len):
            digest.update(chunk)
    return digest.hexdigest()


def verify(folder: Path) -> Dict[str, Tuple[str, bool]]:
    """Each archive present: its MD5 and whether it is the published one."""
    found = {name: md5 for name, md5 in ARCHIVE_META.values() if (folder / name).is_file()}
    if not found:
        source, zipped = download_of(folder), kaggle.find_zip(folder)
        if source is not None and source.layout.startswith("kaggle"):  # the zip, or its tree unzipped
            crc = "; python -m zipfile -t on it checks its members' CRC-32s (damage, not tampering)" if zipped else ""
            raise DatasetLayoutError(f"{zipped or folder} is {source.described}: Kaggle publishes no MD5s, so it "
                                     f"cannot be checked against official checksums{crc}")
        raise DatasetLayoutError(f"{folder} holds none of {', '.join(name for name, _ in ARCHIVE_META.values())}")
    return {name: (got, got == md5) for name, md5 in found.items() for got in (md5_of(folder / name),)}


def place(data: bytes, target: Path) -> bool:
    """Write one image unless it is there already; True if written. A different file there: OUT holds another result."""
    if target.is_file():
        if target.read_bytes() != data:
            raise DatasetLayoutError(f"{target} exists and differs from the image it would hold: arrange into an "
                                     f"empty folder, or the folder of an earlier arrange of this download")
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data)
    except OSError as exc:  # a full disk: its own error names no file
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    return True


def arrange_split(dataset: ImageDataset, out: Path) -> Tuple[int, int, int]:
    """(written, kept, unreadable) into out/<wnid>/<file>, by way of out.partial/ unless `out` was arranged before."""
    whole = out.is_dir()
    into = out if whole else out.with_name(out.name + ".partial")
    counts = [0, 0, 0]
    for index in progress(range(len(dataset)), f"arranging {out}", len(dataset), "images"):
        path, target = dataset.samples[index]
        try:
            data = dataset.read(index)
        except DECODE_ERRORS as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            counts[2] += 1
            continue
        counts[0 if place(data, into / dataset.classes[target] / os.path.basename(path)) else 1] += 1
    if not whole:
        into.mkdir(parents=True, exist_ok=True)  # a split of unreadable images only
        os.replace(into, out)
    return tuple(counts)


def arrange(root: Path, out: Path) -> Dict[str, Tuple[int, int, int]]:
    """Any download's splits into OUT/train and OUT/val (OUT may be the download's folder)."""
    source = download_of(root)
    if source is None:
        raise DatasetLayoutError(f"{root} holds none of ImageNet's downloads (the official archives, Kaggle's zip or "
                                 f"its tree): arrange writes class folders from one of those")
    if source.layout == "kaggle" and absolute(out) == absolute(kaggle.tree_root(root)):
        raise DatasetLayoutError(f"--out {out} is the folder of the download's own train/ and val/: give another")
    train, val = build_splits(DataConfig(dir=str(root), layout=source.layout), None, None, 0)
    return {"train": arrange_split(train, out / "train"), "val": arrange_split(val, out / "val")}


def arrange_by_class(flat_dir: Path, label_file: Path, out_dir: Path, symlinks: bool = False) -> int:
    """A flat validation folder as class folders, linked, not copied; returns the images placed."""
    wnids, names = labels_from(label_file).wnids, image_files(Path(flat_dir))
    for image in (Path(flat_dir) / name for name in names):
        if image.name not in wnids:
            raise DatasetLayoutError(f"{image} has no label in {label_file}")
        target = Path(out_dir) / wnids[image.name] / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            if symlinks:
                target.symlink_to(image.resolve())
            else:
                os.link(image, target)
    return len(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="compare the archives' MD5s with the published ones")
    check.add_argument("folder", type=Path, help="the folder that holds the archives")
    extract = commands.add_parser("arrange", help="write a download's images, or link a flat val folder's, as "
                                                  "class folders")
    source = extract.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="the archives' folder, Kaggle's zip or tree")
    source.add_argument("--val-dir", type=Path, help="a flat folder of ILSVRC2012_val_*.JPEG, to link")
    labels = extract.add_mutually_exclusive_group()
    labels.add_argument("--devkit", type=Path,
                        help=f"--val-dir's labels: {DEVKIT_ARCHIVE} or torchvision's {META_FILE}")
    labels.add_argument("--val-solution", type=Path, help=f"--val-dir's labels: Kaggle's {KAGGLE_SOLUTION}")
    extract.add_argument("--out", required=True, type=Path, help="the folder for train/ and val/ (--val-dir: the "
                                                                  "class folders)")
    extract.add_argument("--symlink", action="store_true", help="--val-dir: symbolic links instead of hard links")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the progress of a stage of minutes
    try:
        if args.command == "verify":
            results = verify(args.folder)
            for name, (md5, ok) in results.items():
                print(f"{name}: {md5} {'OK' if ok else 'DIFFERS from the published MD5: download it again'}")
            return 0 if all(ok for _, ok in results.values()) else 2
        if args.val_dir:
            if not (args.devkit or args.val_solution):
                parser.error("--val-dir needs its labels: --devkit or --val-solution")
            count = arrange_by_class(args.val_dir, args.devkit or args.val_solution, args.out, args.symlink)
            print(f"{count} images linked into class folders under {args.out}")
            return 0
        for split, (written, kept, unreadable) in arrange(args.data_dir, args.out).items():
            print(f"{split}: {written} images written, {kept} already there, {unreadable} unreadable skipped")
    except (DatasetLayoutError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
