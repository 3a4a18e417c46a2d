"""Class folders: DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, classes in sorted order (timm's), listed
once and cached; and every folder layout of an evaluation set (EVAL_LAYOUTS), a flat one labelled by labels.py."""
import hashlib
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from common.errors import DatasetLayoutError

from ..config import DataConfig
from ..sample_index import Sample, SampleIndex, absolute, cached
from .labels import DEVKIT_ARCHIVE, KAGGLE_SOLUTION, find_label_file, is_image_name, labelled, labels_from

EXPECTS = ("DIR/train/<wnid>/*.JPEG (one folder per WordNet id, classes in sorted order) and "
           "DIR/val/<wnid>/*.JPEG, or a flat DIR/val/ with its labels beside it")
EXPECTED_LAYOUT = f"expected class folders: {EXPECTS}"
EVAL_LAYOUTS = ("expected class folders (DIR/<wnid>/*.JPEG), ImageNetV2's numbered folders (DIR/0 .. DIR/999), "
                "or a flat folder of ILSVRC2012_val_*.JPEG with its labels")
ARRANGE = "python -m data.downloads arrange --val-dir VAL --val-solution LOC_val_solution.csv --out OUT/val"
SPLIT_NAMES = ("train", "val", "validation", "test")  # subfolders that mark a dataset root
# What decides which files a listing keeps: a cache made under another rule is built again.
LISTING_RULE = "2: IMAGE_EXTENSIONS, no dot-files, links that lead nowhere kept; absolute paths"
RACY_NS = 2_000_000_000  # a folder changed this close to its listing may have changed unseen


def image_files(folder: Path) -> List[str]:
    """Sorted. os.scandir takes file types from the listing: no stat per file (1.28M files on NFS). A link
    that leads to no folder is listed: a dangling one, or a loop, fails when read and counts as unreadable."""
    def is_file(entry: os.DirEntry) -> bool:
        try:
            return entry.is_file() or (entry.is_symlink() and not entry.is_dir())
        except OSError:  # a loop of links: "too many levels of symbolic links"
            return True

    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if is_image_name(e.name) and is_file(e))


def subfolders(folder: Path) -> List[str]:
    def is_folder(entry: os.DirEntry) -> bool:
        try:
            return entry.is_dir()
        except OSError as exc:  # a loop of links where a class folder would be: its images cannot be known
            raise DatasetLayoutError(f"{entry.path} cannot be followed ({exc.strerror}): fix or remove the link") \
                from None

    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and is_folder(e))


def find_classes(split_dir: Path) -> List[str]:
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"{split_dir} does not exist or is not a folder; {EXPECTED_LAYOUT}")
    classes = subfolders(split_dir)
    if not classes:
        loose = len(image_files(split_dir))
        hint = (f" It holds {loose} image files directly: a flat folder, not class folders. Put its labels beside "
                f"it ({DEVKIT_ARCHIVE} or Kaggle's {KAGGLE_SOLUTION}), or arrange it into class folders: "
                f"{ARRANGE}.") if loose else ""
        raise DatasetLayoutError(f"{split_dir} has no class folders.{hint} {EXPECTED_LAYOUT}")
    return classes


def list_split(split_dir: Path, classes: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    unknown = sorted(set(find_classes(split_dir)) - set(classes))
    if unknown:
        raise DatasetLayoutError(f"{split_dir} has {len(unknown)} class folders that the training classes lack, "
                                 f"e.g. {unknown[:3]}; {EXPECTED_LAYOUT}")
    files = [image_files(split_dir / name) if (split_dir / name).is_dir() else [] for name in classes]
    empty = [name for name, found in zip(classes, files) if not found]
    if empty:
        raise DatasetLayoutError(f"{split_dir}: {len(empty)} of {len(classes)} classes have no images (missing or "
                                 f"empty folders, e.g. {empty[:3]}); {EXPECTED_LAYOUT}")
    return [str(split_dir / name) for name in classes], files


def index_split(split_dir: Path, classes: Sequence[str]) -> List[Sample]:
    folders, files = list_split(split_dir, classes)
    return [(f"{folder}/{name}", target) for target, (folder, names) in enumerate(zip(folders, files))
            for name in names]


def cached_index(split_dir: Path, classes: Sequence[str], index_dir: str = "") -> SampleIndex:
    """list_split's samples, cached; listed again when a class folder's modification time (a file added or
    removed) or the split folder's (a class) changed. A listing within RACY_NS of a change is not cached."""
    split_dir = absolute(split_dir)

    def mtime(folder: Path) -> int:
        try:
            return os.stat(folder).st_mtime_ns
        except OSError:
            return -1

    times = [mtime(split_dir)] + [mtime(split_dir / name) for name in classes]
    key = [LISTING_RULE, str(split_dir), list(classes), times]

    def build(previous):
        listed_ns = time.time_ns()
        index = SampleIndex.from_names(*list_split(split_dir, classes), range(len(classes)))
        return index, key if max(times) < listed_ns - RACY_NS else None

    return cached(str(split_dir), split_dir.parent, f"{split_dir.name}.idx", key, build, index_dir)


def flat_split(folder: Path, classes: List[str], label_file: Optional[Path] = None) -> SampleIndex:
    """A flat folder of validation images with their labels (beside it, or `label_file`)."""
    label_file = label_file or find_label_file(folder)
    if label_file is None:
        raise DatasetLayoutError(f"{folder} is a flat folder of images without labels: put Kaggle's {KAGGLE_SOLUTION} "
                                 f"or {DEVKIT_ARCHIVE} beside it, or arrange it into class folders: {ARRANGE}")
    rows = labelled(image_files(folder), labels_from(label_file), classes, str(folder), label_file.name)
    return SampleIndex.from_samples([(str(folder / name), target) for target, _, name in rows])


def holds(root: Path) -> bool:
    return (root / "train").is_dir()


def splits(root: Path, config: DataConfig, seed: int) -> Tuple[SampleIndex, SampleIndex, List[str]]:
    """train/ and val/, or (data.holdout_fraction > 0) train/ in two."""
    classes = find_classes(root / "train")
    train = cached_index(root / "train", classes, config.index_dir)
    if config.holdout_fraction > 0:
        train, val = map(SampleIndex.from_samples, hold_out(train, classes, config.holdout_fraction, seed))
    elif (root / "val").is_dir():
        val = cached_index(root / "val", classes, config.index_dir)
    else:
        raise DatasetLayoutError(f"{root / 'val'} does not exist: add it with the same class folders as train/, or set "
                                 f"data.holdout_fraction (e.g. 0.1) to evaluate on that fraction of each class of "
                                 f"train/, held out from training; {EXPECTED_LAYOUT}")
    return train, val, classes


def hold_out(samples: Sequence[Sample], classes: Sequence[str], fraction: float,
             seed: int) -> Tuple[List[Sample], List[Sample]]:
    """(kept, held out): round(fraction x n) of each class's n images, at least one, never all: those whose
    hash of (seed, class folder, file name) is lowest. The same on every rank, on resume and wherever the
    data is mounted, and a file added later moves at most one other image across."""
    def rank(sample: Sample) -> bytes:
        path = Path(sample[0])
        return hashlib.sha256(f"{seed}/{path.parent.name}/{path.name}".encode()).digest()

    by_class: List[List[Sample]] = [[] for _ in classes]
    for sample in samples:
        by_class[sample[1]].append(sample)
    held = set()
    for name, members in zip(classes, by_class):
        if len(members) < 2:
            raise DatasetLayoutError(f"class {name} has {len(members)} image(s) in train/: data.holdout_fraction "
                                     f"needs at least 2 in each class (one to train on, one to hold out)")
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held.update(path for path, _ in sorted(members, key=rank)[:count])
    return [s for s in samples if s[0] not in held], [s for s in samples if s[0] in held]


def eval_folder(root: Path, split: str) -> Path:
    """root/<split> if it exists, else root itself, unless root is plainly a dataset root (SPLIT_NAMES)."""
    if (root / split).is_dir():
        return root / split
    if root.is_dir():
        found = [name for name in subfolders(root) if name.lower() in SPLIT_NAMES]
        if found:
            raise DatasetLayoutError(f"{root} has no {split}/ folder (it has {', '.join(n + '/' for n in found)}): "
                                     f"pass the evaluation folder itself, or --split NAME")
    return root


def evaluation(folder: Path, label_file: Optional[Path] = None) -> Tuple[Sequence[Sample], List[str], str]:
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} does not exist or is not a folder; {EVAL_LAYOUTS}")
    found = subfolders(folder)
    if found and all(name.isdigit() for name in found):
        classes = [str(i) for i in range(len(found))]  # numeric order, not string order
        if sorted(found, key=int) != classes:
            raise DatasetLayoutError(f"{folder}: numbered class folders (ImageNetV2) must be 0..{len(classes) - 1}, "
                                     f"got {found[:5]}...")
        return index_split(folder, classes), classes, "imagenetv2"
    if found:
        return index_split(folder, found), found, "class-folders"
    if not image_files(folder):
        raise DatasetLayoutError(f"{folder} holds no images and no class folders; {EVAL_LAYOUTS}")
    label_file = label_file or find_label_file(folder)
    if label_file is None:
        raise DatasetLayoutError(f"{folder}: a flat folder of ILSVRC2012_val_*.JPEG needs its labels: --devkit "
                                 f"{DEVKIT_ARCHIVE} (or the meta.bin torchvision writes from it) or --val-solution "
                                 f"{KAGGLE_SOLUTION}, or rearrange it into class folders with: {ARRANGE}")
    classes, layout = labels_from(label_file).classes, "flat-kaggle" if label_file.suffix == ".csv" else "flat-devkit"
    return flat_split(folder, classes, label_file), classes, layout
