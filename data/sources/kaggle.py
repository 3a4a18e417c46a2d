"""Kaggle's ImageNet download unzipped (imagenet-object-localization-challenge), read as it is.

    TOP/ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG       class folders
    TOP/ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_*.JPEG  flat: labelled by
    TOP/LOC_val_solution.csv                           (the first wnid of each PredictionString)

--data-dir may name TOP or its ILSVRC/Data/CLS-LOC; any root whose train/ holds class folders
and whose val/ is flat is read the same way, its labels found beside val/ (a devkit, meta.bin
or the CSV) or at the top of Kaggle's tree. The validation images are put in the class
folders' order (class, then file name), so a run evaluates them as it would in val/<wnid>/.
"""
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import DatasetLayoutError
from ..fast_decode import ImageTransform
from .class_folders import ImageFolderDataset, Sample, cached_index, find_classes, image_files, subfolders
from .val_labels import DEVKIT_ARCHIVE, KAGGLE_DATA, KAGGLE_SOLUTION, find_label_file, labels_from

ARRANGE = "python -m data.val_layouts arrange --val-dir VAL --val-solution LOC_val_solution.csv --out OUT/val"


def kaggle_root(root: Path) -> Optional[Path]:
    """The folder with train/ and a flat val/ (Kaggle's ILSVRC/Data/CLS-LOC, or root itself); None if neither."""
    for place in (root / KAGGLE_DATA, root):
        val = place / "val"
        if (place / "train").is_dir() and val.is_dir() and not subfolders(val) and image_files(val):
            return place
    return None


def kaggle_place(root: Path) -> Path:
    """kaggle_root, or one line that says what data.layout=kaggle expects instead."""
    place = kaggle_root(root)
    if place is None:
        raise DatasetLayoutError(f"data.layout is kaggle but {root} holds neither Kaggle's zip nor its download "
                                 f"unzipped ({KAGGLE_DATA}/train/<wnid>/ and a flat {KAGGLE_DATA}/val/, with "
                                 f"{KAGGLE_SOLUTION} at the top); set data.layout=auto to read what it holds")
    return place


def flat_val_samples(val: Path, classes: List[str]) -> List[Sample]:
    """A flat val/'s images with their labels, in the class folders' order."""
    source = find_label_file(val)
    if source is None:
        raise DatasetLayoutError(f"{val} is a flat folder of images without labels: put Kaggle's {KAGGLE_SOLUTION} "
                                 f"or {DEVKIT_ARCHIVE} beside it, or arrange it into class folders: {ARRANGE}")
    wnids, index = labels_from(source).wnids, {wnid: i for i, wnid in enumerate(classes)}
    names = image_files(val)
    unlabelled = [name for name in names if name not in wnids]
    if unlabelled:
        raise DatasetLayoutError(f"{len(unlabelled)} of the {len(names)} images in {val} have no label in {source}, "
                                 f"e.g. {unlabelled[0]}")
    unknown = sorted({wnids[name] for name in names} - set(index))
    if unknown:
        raise DatasetLayoutError(f"{source} labels images of {len(unknown)} classes that {val.parent / 'train'} has no "
                                 f"folder for, e.g. {unknown[0]}")
    return sorted(((str(val / name), index[wnids[name]]) for name in names), key=lambda sample: (sample[1], sample[0]))


def kaggle_eval_set(root: Path) -> Tuple[List[Sample], List[str]]:
    """validate.py's samples and classes (the train/ class folders' names)."""
    place = kaggle_place(root)
    classes = find_classes(place / "train")
    return flat_val_samples(place / "val", classes), classes


def build_kaggle_splits(root: Path, train_transform: ImageTransform, eval_transform: ImageTransform, seed: int,
                        index_dir: str = "") -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    place = kaggle_place(root)
    classes = find_classes(place / "train")
    train = cached_index(place / "train", classes, index_dir)
    val = flat_val_samples(place / "val", classes)
    return ImageFolderDataset(train, classes, train_transform, seed=seed), \
        ImageFolderDataset(val, classes, eval_transform)
