"""The labels of ImageNet's flat validation images: from the devkit or from Kaggle's file.

    ILSVRC2012_devkit_t12.tar.gz     meta.mat and the ground truth, in ILSVRC2012 IDs (meta.mat's
                                     order, not sorted wnid order); torchvision's parser turns
                                     them into wnids (or the meta.bin it makes of the devkit)
    LOC_val_solution.csv             Kaggle's: ImageId, PredictionString (the first wnid is the label)

Every reader of flat validation images (a flat folder, the official val tar, Kaggle's download
zipped or not) takes its labels from here, so one image has one label whatever holds it.
"""
import csv
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE, load_meta_file, parse_devkit_archive

from ..errors import DatasetLayoutError

DEVKIT_ARCHIVE = ARCHIVE_META["devkit"][0]  # ILSVRC2012_devkit_t12.tar.gz
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_DATA = Path("ILSVRC", "Data", "CLS-LOC")  # Kaggle's download: its CSV files lie above this


@dataclass
class ValLabels:
    wnids: Dict[str, str]  # {'ILSVRC2012_val_00000001.JPEG': wnid, ...}
    classes: List[str]  # every class of the set, sorted: label i is classes[i]


def devkit_labels(devkit: Path) -> ValLabels:
    """From the devkit archive or the meta.bin torchvision makes of it."""
    devkit = Path(devkit)
    if devkit.name == META_FILE:
        wnid_to_words, val_wnids = load_meta_file(str(devkit.parent))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            # torchvision checks the archive's md5 and writes meta.bin next to it: do that in tmp.
            os.symlink(devkit.resolve(), Path(tmp) / DEVKIT_ARCHIVE)
            try:
                parse_devkit_archive(tmp, DEVKIT_ARCHIVE)
            except RuntimeError as exc:
                raise DatasetLayoutError(f"{devkit}: not ImageNet's devkit archive ({exc})") from None
            wnid_to_words, val_wnids = load_meta_file(tmp)
    return ValLabels({f"ILSVRC2012_val_{i + 1:08d}.JPEG": wnid for i, wnid in enumerate(val_wnids)},
                     sorted(wnid_to_words))


def kaggle_labels(solution_csv: Path) -> ValLabels:
    with open(solution_csv, newline="") as handle:
        return kaggle_rows(handle, solution_csv)


def kaggle_rows(lines: Iterable[str], where: object) -> ValLabels:
    """The first wnid of each PredictionString; the classes are all that the file names. A
    row without an image or a wnid, or an image labelled twice with different classes, is
    refused, naming its line."""
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


def kaggle_bytes(data: bytes, where: object) -> ValLabels:
    """Kaggle's solution file read out of an archive."""
    return kaggle_rows(io.StringIO(data.decode("utf-8"), newline=""), where)


def find_label_file(folder: Path) -> Optional[Path]:
    """A devkit or Kaggle solution lying in the folder or its parent, or at the top of
    Kaggle's download when the folder is its ILSVRC/Data/CLS-LOC/<split>."""
    places = [folder, folder.parent]
    if folder.parent.parts[-3:] == KAGGLE_DATA.parts:
        places.append(folder.parents[3])
    for place in places:
        for name in (META_FILE, DEVKIT_ARCHIVE, KAGGLE_SOLUTION):  # meta.bin: parsed already
            if (place / name).is_file():
                return place / name
    return None


def labels_from(label_file: Path) -> ValLabels:
    return kaggle_labels(label_file) if label_file.suffix == ".csv" else devkit_labels(label_file)
