"""Which files are images, the class names, and the labels and class folders' order of ImageNet's flat
validation images for every reader of them: one image has one label and one place, whatever holds it. The labels:
ILSVRC2012_devkit_t12.tar.gz's ground truth (ILSVRC2012 IDs in meta.mat's order, not sorted wnids, made wnids by
torchvision's parser or its meta.bin), or Kaggle's LOC_val_solution.csv (each PredictionString's first wnid)."""
import csv
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE, load_meta_file, parse_devkit_archive

from common.errors import DatasetLayoutError

# Pillow opens every one of these; the comparison ignores case (ImageNet uses .JPEG).
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SUFFIXES = frozenset(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
DEVKIT_ARCHIVE = ARCHIVE_META["devkit"][0]  # ILSVRC2012_devkit_t12.tar.gz
KAGGLE_SOLUTION = "LOC_val_solution.csv"
LABEL_FILES = (META_FILE, DEVKIT_ARCHIVE, KAGGLE_SOLUTION)  # looked for in this order: meta.bin is parsed already
KAGGLE_DATA = Path("ILSVRC", "Data", "CLS-LOC")  # Kaggle's download: its CSV files lie above this


def is_image_name(name: str) -> bool:
    """A folder's images, and an archive's: an image extension, no dot-file."""
    return name[:1] != "." and "." in name and name.rpartition(".")[2].lower() in SUFFIXES


def default_classes(num_classes: int) -> List[str]:
    """For a set that does not name its classes (timm's shards, timm's weights): timm's 1000 wnids, or numbers."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    return [str(i) for i in range(num_classes)]


class ValLabels(NamedTuple):
    wnids: Dict[str, str]  # {'ILSVRC2012_val_00000001.JPEG': wnid, ...}
    classes: List[str]  # every class of the set, sorted: label i is classes[i]


def kaggle_rows(lines: Iterable[str], where: object) -> ValLabels:
    """The first wnid of each PredictionString; the classes are all that the file names. A row without an
    image or a wnid, or an image labelled twice with different classes, is refused, naming its line."""
    labels, lines_of = {}, {}
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise DatasetLayoutError(f"{where}: expected Kaggle's columns ImageId,PredictionString")
    for row in reader:
        line, image, wnids = reader.line_num, row["ImageId"], (row["PredictionString"] or "").split()
        if not image or not wnids:
            raise DatasetLayoutError(f"{where}, line {line}: expected an ImageId and a PredictionString that starts "
                                     f"with the image's wnid, got {','.join(v for v in row.values() if v)!r}")
        name = f"{image}.JPEG"
        if labels.get(name, wnids[0]) != wnids[0]:
            raise DatasetLayoutError(f"{where}, line {line}: {image} is labelled {wnids[0]}, but {labels[name]} on "
                                     f"line {lines_of[name]}: which is right?")
        labels[name], lines_of[name] = wnids[0], line
    return ValLabels(labels, sorted(set(labels.values())))


def find_label_file(folder: Path) -> Optional[Path]:
    """A devkit or Kaggle solution in the folder or its parent, or at the top of Kaggle's download."""
    places = [folder, folder.parent]
    if folder.parent.parts[-3:] == KAGGLE_DATA.parts:
        places.append(folder.parents[3])
    return next((place / name for place in places for name in LABEL_FILES if (place / name).is_file()), None)


def labels_from(label_file: Path) -> ValLabels:
    """Kaggle's CSV, the devkit archive, or the meta.bin torchvision makes of it."""
    if label_file.suffix == ".csv":
        with open(label_file, newline="") as handle:
            return kaggle_rows(handle, label_file)
    if label_file.name == META_FILE:
        wnid_to_words, val_wnids = load_meta_file(str(label_file.parent))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            # torchvision checks the archive's md5 and writes meta.bin next to it: do that in tmp.
            os.symlink(label_file.resolve(), Path(tmp) / DEVKIT_ARCHIVE)
            try:
                parse_devkit_archive(tmp, DEVKIT_ARCHIVE)
            except RuntimeError as exc:
                raise DatasetLayoutError(f"{label_file}: not ImageNet's devkit archive ({exc})") from None
            wnid_to_words, val_wnids = load_meta_file(tmp)
    return ValLabels({f"ILSVRC2012_val_{i + 1:08d}.JPEG": wnid for i, wnid in enumerate(val_wnids)},
                     sorted(wnid_to_words))


def labelled(names: Iterable[str], labels: ValLabels, classes: List[str], where: str,
             source: str) -> List[Tuple[int, str, str]]:
    """(class, wnid, name) of each flat validation image in the class folders' order. An image without a label,
    or of a class the set does not have, is refused: the labels are not of these images."""
    names = list(names)
    unlabelled = sorted(set(names) - set(labels.wnids))
    if unlabelled:
        raise DatasetLayoutError(f"{source} labels {len(labels.wnids):,} images but {where} holds {len(names):,}, "
                                 f"{len(unlabelled):,} of them without a label (e.g. {unlabelled[0]}): its ground "
                                 f"truth is of other images or cut short; use the labels of this download")
    index = {wnid: i for i, wnid in enumerate(classes)}
    unknown = sorted({labels.wnids[name] for name in names} - set(index))
    if unknown:
        raise DatasetLayoutError(f"{source} labels images of {len(unknown)} classes that the set has no training "
                                 f"folder for, e.g. {unknown[0]}")
    return sorted((index[labels.wnids[name]], labels.wnids[name], name) for name in names)
