"""Kaggle's ImageNet download read straight from its zip, by random access: no unzipping.

    imagenet-object-localization-challenge.zip     (ZIP64, 155 GB)
        ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG
        ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_*.JPEG
        LOC_val_solution.csv                       the validation labels

--data-dir names the zip, or a folder that holds it and nothing else. The index comes from
the zip's central directory (Python's zipfile reads it, ZIP64 included) and each image's
local header (its own extra field moves the data), never an image; then each image is one
pread of its stored bytes, inflated if deflated (data/sources/archive_index.py). The samples are in
the class folders' order, so training from the zip gives the unzipped folders' weights.
"""
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

from .archive_index import Row, read_cached, split_from_rows, warn_problems
from ..errors import DatasetLayoutError
from ..fast_decode import ImageTransform
from ..sample_index import absolute, identity
from .class_folders import is_image_name
from .shards import BadShardSample, ShardDataset, ShardSplit
from .val_labels import KAGGLE_DATA, KAGGLE_SOLUTION, kaggle_bytes

PREFIX = KAGGLE_DATA.as_posix() + "/"  # ILSVRC/Data/CLS-LOC/
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature, ..., name length, extra length: 30 bytes
LOCAL_SIGNATURE = 0x04034B50
READABLE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
ZIP_LAYOUT = (f"expected Kaggle's ImageNet zip: {PREFIX}train/<wnid>/*.JPEG, {PREFIX}val/ILSVRC2012_val_*.JPEG "
              f"and {KAGGLE_SOLUTION}")


# What Kaggle's download holds beside its zip once someone unzipped the small files out of it.
KAGGLE_FILES = {KAGGLE_SOLUTION, "LOC_train_solution.csv", "LOC_sample_submission.csv", "LOC_synset_mapping.txt"}


def find_zip(root: Path) -> Optional[Path]:
    """The zip that `root` names (a damaged one too, to be named as such), or the one zip a
    folder holds with nothing else but Kaggle's CSV and text files; else None."""
    if root.is_file():
        return root if root.suffix.lower() == ".zip" or zipfile.is_zipfile(root) else None
    if not root.is_dir():
        return None
    entries = [path for path in root.iterdir() if not path.name.startswith(".") and path.name not in KAGGLE_FILES]
    return entries[0] if len(entries) == 1 and entries[0].suffix == ".zip" and zipfile.is_zipfile(entries[0]) else None


def member_row(fd: int, info: zipfile.ZipInfo, target: int, name: str) -> Row:
    """(class, name, offset, size, problem, method, length) of one member; its local header
    says where its data starts."""
    header = os.pread(fd, LOCAL_HEADER.size, info.header_offset)
    fields = LOCAL_HEADER.unpack(header) if len(header) == LOCAL_HEADER.size else (0,) * 11
    start = info.header_offset + LOCAL_HEADER.size + fields[9] + fields[10]
    problem = "" if fields[0] == LOCAL_SIGNATURE else \
        f"no local header at byte {info.header_offset}: the zip is damaged"
    if info.compress_type not in READABLE:
        problem = problem or f"zip method {info.compress_type}: only stored and deflated members are read"
    elif info.flag_bits & 0x1:
        problem = problem or "encrypted"
    elif start + info.compress_size > os.fstat(fd).st_size:
        problem = problem or "cut short: the zip ends inside this image"
    return target, name, start, info.compress_size, problem, info.compress_type, info.file_size


def class_names(infos: List[zipfile.ZipInfo]) -> List[str]:
    """The train/ class folders, as a listing of the unzipped train/ would give them."""
    return sorted({info.filename[len(PREFIX) + 6:].split("/")[0] for info in infos
                   if info.filename.startswith(PREFIX + "train/") and info.filename.count("/") >= 5})


def train_members(infos: List[zipfile.ZipInfo], classes: List[str]) -> List[Tuple[zipfile.ZipInfo, int, str]]:
    index = {wnid: i for i, wnid in enumerate(classes)}
    found = []
    for info in infos:
        parts = info.filename[len(PREFIX):].split("/") if info.filename.startswith(PREFIX + "train/") else ()
        if len(parts) == 3 and is_image_name(parts[2]):
            found.append((info, index[parts[1]], f"{parts[1]}/{parts[2]}"))
    return found


def val_members(archive: zipfile.ZipFile, classes: List[str]) -> List[Tuple[zipfile.ZipInfo, int, str]]:
    """The flat val/ images with their labels from the zip's LOC_val_solution.csv."""
    try:
        labels = kaggle_bytes(archive.read(KAGGLE_SOLUTION), f"{archive.filename}:{KAGGLE_SOLUTION}")
    except KeyError:
        raise DatasetLayoutError(f"{archive.filename} holds no {KAGGLE_SOLUTION}, the validation labels; "
                                 f"{ZIP_LAYOUT}") from None
    index, found = {wnid: i for i, wnid in enumerate(classes)}, []
    for info in archive.infolist():
        name = info.filename[len(PREFIX) + 4:] if info.filename.startswith(PREFIX + "val/") else ""
        if "/" in name or not is_image_name(name):
            continue
        if labels.wnids.get(name) not in index:
            raise DatasetLayoutError(f"{archive.filename}: {name} has no label of a train/ class in {KAGGLE_SOLUTION}")
        found.append((info, index[labels.wnids[name]], f"{labels.wnids[name]}/{name}"))
    return found


def scan_zip(path: Path, split: str) -> ShardSplit:
    """One split of the zip from its central directory and its images' local headers."""
    stat = path.stat()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetLayoutError(f"{path} cannot be read as a zip ({exc}): download it again") from None
    with archive, open(path, "rb") as handle:
        classes = class_names(archive.infolist())
        if not classes:
            raise DatasetLayoutError(f"{path} holds no {PREFIX}train/<wnid>/ folders; {ZIP_LAYOUT}")
        members = train_members(archive.infolist(), classes) if split == "train" else val_members(archive, classes)
        rows = [member_row(handle.fileno(), info, target, name) for info, target, name in members]
    if not rows:
        raise DatasetLayoutError(f"{path} holds no {split} images; {ZIP_LAYOUT}")
    return split_from_rows(path, identity(stat), rows, ("method", "length"), classes)


class ZipDataset(ShardDataset):
    """A zip's member is its bytes as stored: deflated ones are inflated here."""

    def read(self, index: int) -> bytes:
        data = super().read(index)
        if self.samples.arrays["method"][index] == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -zlib.MAX_WBITS)
            except zlib.error as exc:
                raise BadShardSample(f"its deflated bytes do not inflate ({exc}): the zip is damaged") from None
        if len(data) != self.samples.arrays["length"][index]:
            raise BadShardSample(f"{len(data)} bytes, not the {self.samples.arrays['length'][index]} the zip lists")
        return data


def read_zip_split(path: Path, split: str, index_dir: str = "") -> ShardSplit:
    path = absolute(path)
    found = read_cached(f"{path.name}-{split}.idx", [path], lambda: scan_zip(path, split), index_dir)
    warn_problems(found, f"{path.name}'s {split} images")
    return found


def build_zip_splits(root: Path, train_transform: ImageTransform, eval_transform: ImageTransform, seed: int,
                     index_dir: str = "") -> Tuple[ZipDataset, ZipDataset]:
    path = find_zip(root)
    train, val = read_zip_split(path, "train", index_dir), read_zip_split(path, "val", index_dir)
    return ZipDataset(train, train.classes, train_transform, seed=seed), ZipDataset(val, val.classes, eval_transform)
