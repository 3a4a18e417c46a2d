"""Every common layout of an ImageNet evaluation set, read into (path, label) samples.

    DIR/<wnid>/*.JPEG                 class folders; labels in sorted wnid order (timm's)
    DIR/0 .. DIR/999                  ImageNetV2: the folder name is the label
    DIR/ILSVRC2012_val_*.JPEG flat    with the devkit (ILSVRC2012_devkit_t12.tar.gz, or the
                                      meta.bin torchvision makes of it) or Kaggle's
                                      LOC_val_solution.csv
    DIR/<name>-validation-NN.tar      WebDataset tar shards (data/shards.py); classes as
                                      _info.json names them, else the model's

The devkit's ground truth holds ILSVRC2012 IDs, numbered in meta.mat's order, not in
sorted wnid order; torchvision's parser turns them into wnids, then wnids into labels.

    python -m data.val_layouts arrange --val-dir flat/ --devkit ILSVRC2012_devkit_t12.tar.gz --out val/
"""
import argparse
import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE, load_meta_file, parse_devkit_archive

from .errors import DatasetLayoutError
from .imagenet import Sample, default_classes, image_files, index_split, subfolders
from .shards import ShardSplit, holds_shards, read_eval_shards

DEVKIT_ARCHIVE = ARCHIVE_META["devkit"][0]  # ILSVRC2012_devkit_t12.tar.gz
KAGGLE_SOLUTION = "LOC_val_solution.csv"

EVAL_LAYOUTS = ("expected class folders (DIR/<wnid>/*.JPEG), ImageNetV2's numbered folders (DIR/0 .. DIR/999), "
                "or a flat folder of ILSVRC2012_val_*.JPEG with its labels")
FLAT_HELP = (f"a flat folder of ILSVRC2012_val_*.JPEG needs its labels: --devkit {DEVKIT_ARCHIVE} (or the "
             f"{META_FILE} torchvision writes from it) or --val-solution {KAGGLE_SOLUTION}, or rearrange it "
             f"into class folders with: python -m data.val_layouts arrange")


@dataclass
class EvalSet:
    samples: List[Sample]
    classes: List[str]  # class names in label order (wnids, or '0'..'999' for ImageNetV2)
    layout: str  # class-folders | imagenetv2 | flat-devkit | flat-kaggle | shards
    shards: Optional[ShardSplit] = None  # where each sample lies, for layout "shards"


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
    """The first wnid of each PredictionString; the classes are all that the file names."""
    labels = {}
    with open(solution_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DatasetLayoutError(f"{solution_csv}: expected Kaggle's columns ImageId,PredictionString")
        for row in reader:
            labels[f"{row['ImageId']}.JPEG"] = row["PredictionString"].split()[0]
    return ValLabels(labels, sorted(set(labels.values())))


def find_label_file(folder: Path) -> Optional[Path]:
    """A devkit or Kaggle solution lying in the folder or its parent."""
    for place in (folder, folder.parent):
        for name in (META_FILE, DEVKIT_ARCHIVE, KAGGLE_SOLUTION):  # meta.bin: parsed already
            if (place / name).is_file():
                return place / name
    return None


def labels_from(label_file: Path) -> ValLabels:
    return kaggle_labels(label_file) if label_file.suffix == ".csv" else devkit_labels(label_file)


def flat_images(folder: Path) -> List[Path]:
    return [folder / name for name in image_files(folder)]


SPLIT_NAMES = ("train", "val", "validation", "test")  # subfolders that mark a dataset root


def eval_folder(root: Path, split: str) -> Path:
    """The folder to evaluate: root/<split> if it exists, else root itself (class folders,
    ImageNetV2's numbered folders, a flat folder), unless root is plainly a dataset root
    (it holds train/, val/, validation/ or test/) that lacks the split."""
    root = Path(root)
    if (root / split).is_dir():
        return root / split
    if root.is_dir():
        splits = [name for name in subfolders(root) if name.lower() in SPLIT_NAMES]
        if splits:
            raise DatasetLayoutError(f"{root} has no {split}/ folder (it has {', '.join(n + '/' for n in splits)}): "
                                     f"pass the evaluation folder itself, or --split NAME")
    return root


def read_eval_set(folder: Path, label_file: Optional[Path] = None) -> EvalSet:
    """Whichever layout `folder` is in; `label_file` labels a flat folder (found if not given)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} does not exist or is not a folder; {EVAL_LAYOUTS}")
    folders = subfolders(folder)
    if folders:
        if all(name.isdigit() for name in folders):
            classes = [str(i) for i in range(len(folders))]  # numeric order, not string order
            if sorted(folders, key=int) != classes:
                raise DatasetLayoutError(f"{folder}: numbered class folders (ImageNetV2) must be 0..{len(classes) - 1}, "
                                         f"got {folders[:5]}...")
            return EvalSet(index_split(folder, classes), classes, "imagenetv2")
        return EvalSet(index_split(folder, folders), folders, "class-folders")

    images = flat_images(folder)
    if not images:
        raise DatasetLayoutError(f"{folder} holds no images and no class folders; {EVAL_LAYOUTS}")
    label_file = label_file or find_label_file(folder)
    if label_file is None:
        raise DatasetLayoutError(f"{folder}: {FLAT_HELP}")
    labels = labels_from(label_file)
    wnids, classes = labels.wnids, labels.classes
    index = {wnid: i for i, wnid in enumerate(classes)}
    unlabelled = [p.name for p in images if p.name not in wnids]
    if unlabelled:
        raise DatasetLayoutError(f"{len(unlabelled)} images in {folder} have no label in {label_file}, "
                                 f"e.g. {unlabelled[:3]}")
    layout = "flat-kaggle" if label_file.suffix == ".csv" else "flat-devkit"
    return EvalSet([(str(p), index[wnids[p.name]]) for p in images], classes, layout)


def find_eval_set(folder: Path, split: str, label_file: Optional[Path], trained_classes: Optional[List[str]],
                  num_classes: int, index_dir: str = "") -> EvalSet:
    """The tar shards of `split` in `folder` if it holds them, else read_eval_set. Shards
    that do not name their classes take the model's: its checkpoint's, else default_classes."""
    if folder.is_dir() and not subfolders(folder) and holds_shards(folder, split):
        shards, classes = read_eval_shards(folder, split, trained_classes or default_classes(num_classes), index_dir)
        return EvalSet(shards.samples, classes, "shards", shards)
    return read_eval_set(folder, label_file)


def arrange_by_class(flat_dir: Path, label_file: Path, out_dir: Path, symlinks: bool = False) -> int:
    """Give a flat validation folder the class-folder layout without copying: hard links
    (same filesystem) or symbolic links. Returns the number of images placed."""
    wnids = labels_from(label_file).wnids
    placed = 0
    for image in flat_images(Path(flat_dir)):
        if image.name not in wnids:
            raise DatasetLayoutError(f"{image} has no label in {label_file}")
        target = Path(out_dir) / wnids[image.name] / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            if symlinks:
                target.symlink_to(image.resolve())
            else:
                os.link(image, target)
        placed += 1
    return placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    arrange = commands.add_parser("arrange", help="link a flat validation folder into class folders")
    arrange.add_argument("--val-dir", required=True, type=Path, help="the flat folder of ILSVRC2012_val_*.JPEG")
    labels = arrange.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", type=Path, help=f"{DEVKIT_ARCHIVE} or torchvision's {META_FILE}")
    labels.add_argument("--val-solution", type=Path, help=f"Kaggle's {KAGGLE_SOLUTION}")
    arrange.add_argument("--out", required=True, type=Path, help="where the class folders go")
    arrange.add_argument("--symlink", action="store_true", help="symbolic links instead of hard links")
    args = parser.parse_args()
    try:
        count = arrange_by_class(args.val_dir, args.devkit or args.val_solution, args.out, args.symlink)
    except (DatasetLayoutError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{count} images linked into class folders under {args.out}")


if __name__ == "__main__":
    main()
