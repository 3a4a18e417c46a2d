"""Training and evaluation straight from ImageNet's official ILSVRC2012 archives: no
extraction, no copy.

    DIR/ILSVRC2012_img_train.tar        138 GB: a tar of 1,000 tars <wnid>.tar, each a class's JPEGs
    DIR/ILSVRC2012_img_val.tar          6.3 GB: 50,000 JPEGs ILSVRC2012_val_%08d.JPEG, flat
    DIR/ILSVRC2012_devkit_t12.tar.gz    the validation labels (or Kaggle's LOC_val_solution.csv)

The inner tars lie in the outer one uncompressed, so every JPEG lies whole at a fixed offset
of the outer file. The index is read from the outer tar's headers and each inner tar's
(data/sources/shard_index.py's tar reader, on a window of the outer file), never an image; then each
image is one pread, as from a tar shard (data/sources/archive_index.py). The classes are the labels'
(the devkit's 1,000, or those Kaggle's file names), so that a class missing from a damaged
train archive does not move the others' labels.
"""
import io
import logging
import os
from pathlib import Path
from typing import BinaryIO, Dict, List, Tuple

from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE

from .archive_index import Row, read_cached, split_from_rows, warn_problems
from ..errors import DatasetLayoutError
from ..fast_decode import ImageTransform
from ..sample_index import absolute, identity
from .class_folders import is_image_name
from .shard_index import Member, tar_members
from .shards import ShardDataset, ShardSplit
from .val_labels import DEVKIT_ARCHIVE, KAGGLE_SOLUTION, ValLabels, labels_from

log = logging.getLogger(__name__)

TRAIN_ARCHIVE = ARCHIVE_META["train"][0]  # ILSVRC2012_img_train.tar
VAL_ARCHIVE = ARCHIVE_META["val"][0]  # ILSVRC2012_img_val.tar
OFFICIAL_COUNTS = {"classes": 1000, "train images": 1_281_167, "validation images": 50_000}
ARCHIVES_LAYOUT = (f"expected ImageNet's archives as downloaded, side by side: DIR/{TRAIN_ARCHIVE} (a tar of "
                   f"<wnid>.tar), DIR/{VAL_ARCHIVE} and DIR/{DEVKIT_ARCHIVE} (or Kaggle's {KAGGLE_SOLUTION})")


def holds_archives(folder: Path) -> bool:
    return (folder / TRAIN_ARCHIVE).is_file() or (folder / VAL_ARCHIVE).is_file()


class Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, as a file of their own: tarfile reads an
    inner tar through it where it lies in the outer one. pread: no shared file position."""

    def __init__(self, handle: BinaryIO, start: int, size: int):
        super().__init__()
        self.fd, self.start, self.size, self.position = handle.fileno(), start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = max(0, offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence])
        return self.position

    def readinto(self, buffer) -> int:
        data = os.pread(self.fd, max(0, min(len(buffer), self.size - self.position)), self.start + self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


# ----------------------------------------------------------------------------- labels and counts


def label_file(folder: Path) -> Path:
    """The validation labels beside the archives; exit 2 without them, since nothing can be evaluated."""
    for name in (META_FILE, DEVKIT_ARCHIVE, KAGGLE_SOLUTION):
        if (folder / name).is_file():
            return folder / name
    raise DatasetLayoutError(f"{folder} has no labels for {VAL_ARCHIVE}: put {DEVKIT_ARCHIVE} (or Kaggle's "
                             f"{KAGGLE_SOLUTION}) beside it")


def check_counts(folder: Path, found: Dict[str, int]) -> None:
    """State the counts at start; a warning names each that is not the official one."""
    differ = [f"{count:,} {what}, not {OFFICIAL_COUNTS[what]:,} ({count - OFFICIAL_COUNTS[what]:+,})"
              for what, count in found.items() if count != OFFICIAL_COUNTS[what]]
    if differ:
        log.warning("the archives in %s hold %s: not ImageNet's official counts", folder, "; ".join(differ))
    else:
        log.info("the archives in %s hold ImageNet's official counts: %s", folder,
                 ", ".join(f"{count:,} {what}" for what, count in found.items()))


def headers(handle: BinaryIO, path: Path, what: str) -> Tuple[os.stat_result, List[Member], str]:
    """The archive's stat (taken first: a change while it is read shows next time), its
    members and what is wrong with its end; exit 2 if it holds nothing at all."""
    stat = os.fstat(handle.fileno())
    members, damage = tar_members(handle, stat.st_size)
    if not members:
        raise DatasetLayoutError(f"{path} holds no {what} ({damage or 'an empty tar'}): not ImageNet's archive; "
                                 f"download it again")
    return stat, members, damage


# ----------------------------------------------------------------------------- the train archive


def scan_train(path: Path, classes: List[str]) -> ShardSplit:
    """Every image of every inner tar, in the class folders' order."""
    with open(path, "rb") as handle:
        stat, outer, damage = headers(handle, path, "class tars")
        rows: List[Row] = []
        for name, offset, length, _ in outer:
            if name.endswith(".tar"):
                rows.extend(inner_rows(handle, name, offset, length, stat.st_size))
    if damage:
        log.warning("%s is cut short or damaged at byte %d (%s): the images after %s are lost; download it again",
                    path, stat.st_size, damage, outer[-1][0])
    return split_from_rows(path, identity(stat), labelled(rows, classes, path, damage))


def inner_rows(handle: BinaryIO, name: str, offset: int, length: int, archive_size: int) -> List[Row]:
    """(wnid, name, offset, size, problem) of one class tar's images; one unreadable row for
    a class tar that cannot be read at all."""
    wnid, available = name[:-len(".tar")].rpartition("/")[2], min(length, archive_size - offset)
    members, damage = tar_members(Window(handle, offset, available), available)
    if not members:
        why = f"cut short at byte {archive_size}" if available < length else f"not a tar archive ({damage})"
        return [(wnid, f"{wnid}/{wnid}.tar", 0, 0, f"{name} in {TRAIN_ARCHIVE} is {why}: its images are lost")]
    if damage and available == length:
        log.warning("%s in %s is damaged (%s): its images after %s are lost", name, TRAIN_ARCHIVE, damage,
                    members[-1][0])
    cut = f"cut short: {TRAIN_ARCHIVE} ends at byte {archive_size}, inside this image"
    return [(wnid, f"{wnid}/{file}", offset + start, size, cut if start + size > available else "")
            for file, start, size in ((m[0].rpartition("/")[2], m[1], m[2]) for m in members) if is_image_name(file)]


def labelled(rows: List[Row], classes: List[str], path: Path, damage: str) -> List[Row]:
    """The rows with class indices for wnids; a class the archive lacks gets one unreadable
    row, so that the loss is counted and every other label keeps its meaning."""
    index, found = {wnid: i for i, wnid in enumerate(classes)}, {row[0] for row in rows}
    unknown = sorted(found - set(index))
    if unknown:
        raise DatasetLayoutError(f"{path} holds {len(unknown)} classes that the validation labels do not name, e.g. "
                                 f"{unknown[:3]}: the labels are not of this archive")
    missing = sorted(set(index) - found)
    why = f"{path.name} is cut short at byte {path.stat().st_size}" if damage else f"{path.name} has no such tar"
    return [(index[row[0]],) + tuple(row[1:]) for row in rows] + \
        [(index[wnid], f"{wnid}/{wnid}.tar", 0, 0, f"lost: {why}") for wnid in missing]


# ----------------------------------------------------------------------------- the validation archive


def scan_val(path: Path, labels: ValLabels, source: Path) -> ShardSplit:
    """The validation images with their labels, in the class folders' order. An image
    without a label stops (the labels are not these images'); a labelled image the archive
    lacks is counted as unreadable."""
    with open(path, "rb") as handle:
        stat, members, _ = headers(handle, path, "images")
    images = {m[0].rpartition("/")[2]: m for m in members if is_image_name(m[0].rpartition("/")[2])}
    unlabelled = sorted(set(images) - set(labels.wnids))
    if unlabelled:
        raise DatasetLayoutError(f"{source.name} labels {len(labels.wnids):,} images but {path.name} holds "
                                 f"{len(images):,}, {len(unlabelled):,} of them without a label "
                                 f"(e.g. {unlabelled[0]}): "
                                 f"its ground truth is of other images or cut short; use the devkit of this archive")
    missing = sorted(set(labels.wnids) - set(images))
    if missing:
        log.warning("%s lacks %d of the %d images that %s labels, e.g. %s: they are counted as unreadable; download "
                    "it again", path, len(missing), len(labels.wnids), source.name, missing[0])
    index = {wnid: i for i, wnid in enumerate(labels.classes)}
    cut = f"cut short: {path.name} ends at byte {stat.st_size}, inside this image"
    rows = [(index[wnid], f"{wnid}/{name}", images[name][1], images[name][2],
             cut if images[name][1] + images[name][2] > stat.st_size else "") if name in images else
            (index[wnid], f"{wnid}/{name}", 0, 0, f"missing: {path.name} holds no {name}")
            for name, wnid in labels.wnids.items()]
    return split_from_rows(path, identity(stat), rows)


# ----------------------------------------------------------------------------- the sets


def read_val(folder: Path, index_dir: str = "") -> Tuple[ShardSplit, List[str]]:
    """The validation split and the classes, for training and for validate.py."""
    folder = absolute(folder)  # one index, whether the folder is named by a relative path or not
    if not (folder / VAL_ARCHIVE).is_file():
        raise DatasetLayoutError(f"{folder} has no {VAL_ARCHIVE}; {ARCHIVES_LAYOUT}")
    source = label_file(folder)
    labels = labels_from(source)
    val = read_cached("archives-val.idx", [folder / VAL_ARCHIVE, source],
                      lambda: scan_val(folder / VAL_ARCHIVE, labels, source), index_dir)
    warn_problems(val, VAL_ARCHIVE)
    return val, labels.classes


def build_archive_splits(folder: Path, train_transform: ImageTransform, eval_transform: ImageTransform, seed: int,
                         index_dir: str = "") -> Tuple[ShardDataset, ShardDataset]:
    """Training and validation sets from the archives in `folder`."""
    folder = absolute(folder)
    if not (folder / TRAIN_ARCHIVE).is_file():
        raise DatasetLayoutError(f"{folder} has no {TRAIN_ARCHIVE}; {ARCHIVES_LAYOUT}")
    val, classes = read_val(folder, index_dir)
    train = read_cached("archives-train.idx", [folder / TRAIN_ARCHIVE, label_file(folder)],
                        lambda: scan_train(folder / TRAIN_ARCHIVE, classes), index_dir)
    warn_problems(train, TRAIN_ARCHIVE)
    check_counts(folder, {"classes": len(classes), "train images": len(train.samples),
                          "validation images": len(val.samples)})
    return ShardDataset(train, classes, train_transform, seed=seed), ShardDataset(val, classes, eval_transform)
