"""Training and evaluation straight from ImageNet's official ILSVRC2012 archives, with no extraction and no copy:
each JPEG is one pread at an offset read from the tar headers (docs/archives.md). The classes are the labels', so
a class missing from a damaged train archive does not move the others' labels."""
import io
import logging
import os
from pathlib import Path
from typing import BinaryIO, List, Tuple

from torchvision.datasets.imagenet import ARCHIVE_META

from common.errors import DatasetLayoutError
from common.progress import progress

from ..config import DataConfig
from ..sample_index import Member, SampleIndex, absolute, cached, files_key, identity
from .labels import DEVKIT_ARCHIVE, KAGGLE_SOLUTION, LABEL_FILES, ValLabels, is_image_name, labelled, labels_from
from .tars import TarMember, tar_members

log = logging.getLogger(__name__)

TRAIN_ARCHIVE = ARCHIVE_META["train"][0]  # ILSVRC2012_img_train.tar
VAL_ARCHIVE = ARCHIVE_META["val"][0]  # ILSVRC2012_img_val.tar
INDEX_RULE = "archives 2"  # changes when what an index holds changes: older caches are rebuilt
OFFICIAL_COUNTS = {"classes": 1000, "train images": 1_281_167, "validation images": 50_000}
EXPECTS = (f"DIR/{TRAIN_ARCHIVE} (a tar of <wnid>.tar), DIR/{VAL_ARCHIVE} and DIR/{DEVKIT_ARCHIVE} (or Kaggle's "
           f"{KAGGLE_SOLUTION}), side by side as downloaded")


def holds(folder: Path) -> bool:
    return (folder / TRAIN_ARCHIVE).is_file() or (folder / VAL_ARCHIVE).is_file()


class Window(io.RawIOBase):
    """Bytes [start, start + size) of a file, for tarfile to read an inner tar in place (pread: no shared position)."""

    def __init__(self, handle: BinaryIO, start: int, size: int):
        super().__init__()
        self.fd, self.start, self.size, self.position = handle.fileno(), start, size, 0

    def seekable(self) -> bool:  # tarfile.extractfile() asks; read() and tell() come from RawIOBase
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = max(0, offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence])
        return self.position

    def readinto(self, buffer) -> int:
        data = os.pread(self.fd, max(0, min(len(buffer), self.size - self.position)), self.start + self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def label_file(folder: Path) -> Path:
    """The validation labels beside the archives; exit 2 without them: nothing can be evaluated."""
    for name in LABEL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DatasetLayoutError(f"{folder} has no labels for {VAL_ARCHIVE}: put {DEVKIT_ARCHIVE} (or Kaggle's "
                             f"{KAGGLE_SOLUTION}) beside it")


def headers(handle: BinaryIO, path: Path, what: str) -> Tuple[os.stat_result, List[TarMember], str]:
    """The archive's stat (taken first: a change while it is read shows next time), its members and what is
    wrong with its end; exit 2 if it holds nothing at all."""
    stat = os.fstat(handle.fileno())
    members, damage = tar_members(handle, stat.st_size, f"reading the headers of {path.name}")
    if not members:
        raise DatasetLayoutError(f"{path} holds no {what} ({damage or 'an empty tar'}): not ImageNet's archive; "
                                 f"download it again")
    return stat, members, damage


def scan_train(path: Path, classes: List[str]) -> SampleIndex:
    """Every image of every inner tar, in the class folders' order; a class the archive lacks gets one
    unreadable sample, so the loss is known and every other label keeps its meaning."""
    warnings: List[Tuple[int, str]] = []
    with open(path, "rb") as handle:
        stat, outer, damage = headers(handle, path, "class tars")
        tars = [member for member in outer if member[0].endswith(".tar")]
        rows = [row for name, offset, length, _ in progress(tars, f"indexing {path.name}", len(tars), "class tars")
                for row in inner_rows(handle, name, offset, length, stat.st_size, warnings)]
    if damage:
        warnings.insert(0, (0, f"{path} is cut short or damaged at byte {stat.st_size} ({damage}): the images after "
                               f"{outer[-1][0]} are lost; download it again"))
    index, found = {wnid: i for i, wnid in enumerate(classes)}, {wnid for wnid, _ in rows}
    unknown = sorted(found - set(index))
    if unknown:
        raise DatasetLayoutError(f"{path} holds {len(unknown)} classes that the validation labels do not name, e.g. "
                                 f"{unknown[:3]}: the labels are not of this archive")
    why = f"{path.name} is cut short at byte {stat.st_size}" if damage else f"{path.name} has no such tar"
    members = [member._replace(target=index[wnid]) for wnid, member in rows] + \
        [Member(index[wnid], f"{wnid}/{wnid}.tar", 0, 0, 0, f"lost: {why}") for wnid in sorted(set(index) - found)]
    return SampleIndex.from_members([str(path)], [identity(stat)], sorted(members, key=lambda m: (m.target, m.name)),
                                    warnings=warnings)


def inner_rows(handle: BinaryIO, name: str, offset: int, length: int, archive_size: int,
               warnings: List[Tuple[int, str]]) -> List[Tuple[str, Member]]:
    """(wnid, its sample) for each image of one class tar; one unreadable sample for an unreadable tar."""
    wnid, available = name[:-len(".tar")].rpartition("/")[2], min(length, archive_size - offset)
    members, damage = tar_members(Window(handle, offset, available), available)
    if not members:
        why = f"cut short at byte {archive_size}" if available < length else f"not a tar archive ({damage})"
        return [(wnid, Member(-1, f"{wnid}/{wnid}.tar", 0, 0, 0, f"{name} in {TRAIN_ARCHIVE} is {why}: its images "
                                                                 f"are lost"))]
    if damage and available == length:
        warnings.append((0, f"{name} in {TRAIN_ARCHIVE} is damaged ({damage}): its images after {members[-1][0]} are "
                            f"lost"))
    cut = f"cut short: {TRAIN_ARCHIVE} ends at byte {archive_size}, inside this image"
    return [(wnid, Member(-1, f"{wnid}/{file}", 0, offset + start, size, cut if start + size > available else ""))
            for file, start, size in ((m[0].rpartition("/")[2], m[1], m[2]) for m in members) if is_image_name(file)]


def scan_val(path: Path, labels: ValLabels, source: Path) -> SampleIndex:
    """The validation images with their labels, in the class folders' order. An image without a label stops
    (the labels are not these images'); a labelled image the archive lacks is counted as unreadable."""
    with open(path, "rb") as handle:
        stat, members, _ = headers(handle, path, "images")
    images = {m[0].rpartition("/")[2]: m for m in members if is_image_name(m[0].rpartition("/")[2])}
    cut = f"cut short: {path.name} ends at byte {stat.st_size}, inside this image"
    rows = [Member(target, f"{wnid}/{name}", 0, images[name][1], images[name][2],
                   cut if images[name][1] + images[name][2] > stat.st_size else "")
            for target, wnid, name in labelled(images, labels, labels.classes, path.name, source.name)]
    index = {wnid: i for i, wnid in enumerate(labels.classes)}
    missing = sorted(set(labels.wnids) - set(images))
    rows += [Member(index[labels.wnids[name]], f"{labels.wnids[name]}/{name}", 0, 0, 0,
                    f"missing: {path.name} holds no {name}") for name in missing]
    warnings = [(0, f"{path} lacks {len(missing)} of the {len(labels.wnids)} images that {source.name} labels, e.g. "
                    f"{missing[0]}: they are counted as unreadable; download it again")] if missing else []
    return SampleIndex.from_members([str(path)], [identity(stat)], sorted(rows, key=lambda m: (m.target, m.name)),
                                    warnings=warnings)


def val_index(folder: Path, index_dir: str) -> Tuple[SampleIndex, List[str]]:
    folder = absolute(folder)  # one index, whether the folder is named by a relative path or not
    if not (folder / VAL_ARCHIVE).is_file():
        raise DatasetLayoutError(f"{folder} has no {VAL_ARCHIVE}; expected ImageNet's archives: {EXPECTS}")
    source = label_file(folder)
    labels = labels_from(source)
    key = [INDEX_RULE, *files_key(folder / VAL_ARCHIVE, source)]
    return cached(VAL_ARCHIVE, folder, "archives-val.idx", key,
                  lambda previous: (scan_val(folder / VAL_ARCHIVE, labels, source), key), index_dir), labels.classes


def splits(root: Path, config: DataConfig, seed: int) -> Tuple[SampleIndex, SampleIndex, List[str]]:
    folder = absolute(root)
    if not (folder / TRAIN_ARCHIVE).is_file():
        raise DatasetLayoutError(f"{folder} has no {TRAIN_ARCHIVE}; expected ImageNet's archives: {EXPECTS}")
    val, classes = val_index(folder, config.index_dir)
    key = [INDEX_RULE, *files_key(folder / TRAIN_ARCHIVE, label_file(folder))]
    train = cached(TRAIN_ARCHIVE, folder, "archives-train.idx", key,
                   lambda previous: (scan_train(folder / TRAIN_ARCHIVE, classes), key), config.index_dir)
    found = {"classes": len(classes), "train images": len(train), "validation images": len(val)}
    differ = [f"{count:,} {what}, not {OFFICIAL_COUNTS[what]:,} ({count - OFFICIAL_COUNTS[what]:+,})"
              for what, count in found.items() if count != OFFICIAL_COUNTS[what]]
    if differ:
        log.warning("the archives in %s hold %s: not ImageNet's official counts", folder, "; ".join(differ))
    else:
        log.info("the archives in %s hold ImageNet's official counts: %s", folder,
                 ", ".join(f"{count:,} {what}" for what, count in found.items()))
    return train, val, classes


def evaluation(root: Path, index_dir: str) -> Tuple[SampleIndex, List[str], str]:
    return (*val_index(root, index_dir), "archives")
