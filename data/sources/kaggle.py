"""Kaggle's ImageNet download (imagenet-object-localization-challenge), zipped or not, read as it is in the class
folders' order (docs/archives.md): unzipped, class folders and a flat val/ labelled by LOC_val_solution.csv; zipped,
from the central directory (zipfile reads ZIP64) and each image's local header (its extra field moves the data)."""
import io
import os
import struct
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

from common.errors import DatasetLayoutError
from common.progress import progress

from ..config import DataConfig
from ..sample_index import Member, SampleIndex, absolute, cached, files_key, identity
from .folders import cached_index, find_classes, flat_split, image_files, subfolders
from .labels import KAGGLE_DATA, KAGGLE_SOLUTION, is_image_name, kaggle_rows, labelled

PREFIX = KAGGLE_DATA.as_posix() + "/"  # ILSVRC/Data/CLS-LOC/
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature, ..., name length, extra length: 30 bytes
LOCAL_SIGNATURE = 0x04034B50
READABLE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
INDEX_RULE = "kaggle zip 2"  # changes when what an index holds changes: older caches are rebuilt
ZIP_EXPECTS = (f"imagenet-object-localization-challenge.zip (or a folder that holds it) with "
               f"{PREFIX}train/<wnid>/*.JPEG, {PREFIX}val/ILSVRC2012_val_*.JPEG and {KAGGLE_SOLUTION} "
               f"(docs/archives.md)")
TREE_EXPECTS = f"{KAGGLE_DATA}/train/<wnid>/ and a flat {KAGGLE_DATA}/val/, with {KAGGLE_SOLUTION} at the top"
# What Kaggle's download holds beside its zip once someone unzipped the small files out of it.
KAGGLE_FILES = {KAGGLE_SOLUTION, "LOC_train_solution.csv", "LOC_sample_submission.csv", "LOC_synset_mapping.txt"}
Split = Tuple[SampleIndex, SampleIndex, List[str]]


def tree_root(root: Path) -> Optional[Path]:
    """The folder with train/ and a flat val/ (Kaggle's ILSVRC/Data/CLS-LOC, or root itself), if any; its
    labels lie beside val/ or at the top."""
    for place in (root / KAGGLE_DATA, root):
        val = place / "val"
        if (place / "train").is_dir() and val.is_dir() and not subfolders(val) and image_files(val):
            return place
    return None


def tree_place(root: Path) -> Tuple[Path, List[str]]:
    """tree_root and its classes, or one line that says what data.layout=kaggle expects instead."""
    place = tree_root(root)
    if place is None:
        raise DatasetLayoutError(f"data.layout is kaggle but {root} holds neither Kaggle's zip nor its download "
                                 f"unzipped ({TREE_EXPECTS}); set data.layout=auto to read what it holds")
    return place, find_classes(place / "train")


def tree_splits(root: Path, config: DataConfig, seed: int) -> Split:
    place, classes = tree_place(root)
    return cached_index(place / "train", classes, config.index_dir), flat_split(place / "val", classes), classes


def tree_evaluation(root: Path, index_dir: str) -> Tuple[SampleIndex, List[str], str]:
    place, classes = tree_place(root)
    return flat_split(place / "val", classes), classes, "kaggle"


def find_zip(root: Path) -> Optional[Path]:
    """The zip `root` names (a damaged one too, to be named as such), or the one zip a folder holds beside
    nothing but Kaggle's CSV and text files."""
    if root.is_file():
        return root if root.suffix.lower() == ".zip" or zipfile.is_zipfile(root) else None
    if not root.is_dir():
        return None
    entries = [path for path in root.iterdir() if not path.name.startswith(".") and path.name not in KAGGLE_FILES]
    return entries[0] if len(entries) == 1 and entries[0].suffix == ".zip" and zipfile.is_zipfile(entries[0]) else None


def member(fd: int, info: zipfile.ZipInfo, target: int, name: str) -> Member:
    """One image of the zip; its local header says where its data starts."""
    header = os.pread(fd, LOCAL_HEADER.size, info.header_offset)
    fields = LOCAL_HEADER.unpack(header) if len(header) == LOCAL_HEADER.size else (0,) * 11
    start = info.header_offset + LOCAL_HEADER.size + fields[9] + fields[10]
    damaged = f"no local header at byte {info.header_offset}: the zip is damaged"
    problem = "" if fields[0] == LOCAL_SIGNATURE else damaged
    if info.compress_type not in READABLE:
        problem = problem or f"zip method {info.compress_type}: only stored and deflated members are read"
    elif info.flag_bits & 0x1:
        problem = problem or "encrypted"
    elif start + info.compress_size > os.fstat(fd).st_size:
        problem = problem or "cut short: the zip ends inside this image"
    return Member(target, name, 0, start, info.compress_size, problem, info.compress_type, info.file_size)


def scan_zip(path: Path, split: str) -> SampleIndex:
    """One split, in the class folders' order; the classes are its train/ folders, as a listing would give."""
    stat = path.stat()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetLayoutError(f"{path} cannot be read as a zip ({exc}): download it again") from None
    with archive, open(path, "rb") as handle:
        parts = {info: info.filename[len(PREFIX):].split("/") for info in archive.infolist()
                 if info.filename.startswith(PREFIX)}
        classes = sorted({p[1] for p in parts.values() if p[0] == "train" and len(p) >= 3})
        if not classes:
            raise DatasetLayoutError(f"{path} holds no {PREFIX}train/<wnid>/ folders; expected Kaggle's zip: "
                                     f"{ZIP_EXPECTS}")
        index = {wnid: i for i, wnid in enumerate(classes)}
        if split == "train":
            found = [(info, index[p[1]], f"{p[1]}/{p[2]}") for info, p in parts.items()
                     if p[0] == "train" and len(p) == 3 and is_image_name(p[2])]
        else:
            images = {p[1]: info for info, p in parts.items() if p[0] == "val" and len(p) == 2 and is_image_name(p[1])}
            try:
                solution = archive.read(KAGGLE_SOLUTION)
            except KeyError:
                raise DatasetLayoutError(f"{path} holds no {KAGGLE_SOLUTION}, the validation labels; expected "
                                         f"Kaggle's zip: {ZIP_EXPECTS}") from None
            labels = kaggle_rows(io.StringIO(solution.decode("utf-8"), newline=""), f"{path}:{KAGGLE_SOLUTION}")
            found = [(images[name], target, f"{wnid}/{name}") for target, wnid, name in
                     labelled(images, labels, classes, path.name, KAGGLE_SOLUTION)]
        found = progress(found, f"indexing {path.name}'s {split} images", len(found), "images")
        members = sorted((member(handle.fileno(), *each) for each in found), key=lambda m: (m.target, m.name))
    if not members:
        raise DatasetLayoutError(f"{path} holds no {split} images; expected Kaggle's zip: {ZIP_EXPECTS}")
    return SampleIndex.from_members([str(path)], [identity(stat)], members, classes=classes)


def zip_index(path: Path, split: str, index_dir: str) -> SampleIndex:
    path = absolute(path)
    key = [INDEX_RULE, *files_key(path)]
    return cached(f"{path.name}'s {split} images", path.parent, f"{path.name}-{split}.idx", key,
                  lambda previous: (scan_zip(path, split), key), index_dir)


def zip_splits(root: Path, config: DataConfig, seed: int) -> Split:
    path = find_zip(root)
    train, val = zip_index(path, "train", config.index_dir), zip_index(path, "val", config.index_dir)
    return train, val, train.classes


def zip_evaluation(root: Path, index_dir: str) -> Tuple[SampleIndex, List[str], str]:
    val = zip_index(find_zip(root), "val", index_dir)
    return val, val.classes, "kaggle-zip"
