"""Every common layout of an ImageNet evaluation set, read into (path, label) samples.

    DIR/<wnid>/*.JPEG                 class folders; labels in sorted wnid order (timm's)
    DIR/0 .. DIR/999                  ImageNetV2: the folder name is the label
    DIR/ILSVRC2012_val_*.JPEG flat    with the devkit (ILSVRC2012_devkit_t12.tar.gz, or the
                                      meta.bin torchvision makes of it) or Kaggle's
                                      LOC_val_solution.csv
    DIR/<name>-validation-NN.tar      WebDataset tar shards (data/sources/shards.py); classes as
                                      _info.json names them, else the model's
    DIR/ILSVRC2012_img_val.tar        ImageNet's official archives, and Kaggle's download
    Kaggle's zip or tree              zipped or not (data/sources/layout.py, docs/archives.md)

The devkit's ground truth holds ILSVRC2012 IDs, numbered in meta.mat's order, not in
sorted wnid order; torchvision's parser turns them into wnids, then wnids into labels.

    python -m data.val_layouts arrange --val-dir flat/ --devkit ILSVRC2012_devkit_t12.tar.gz --out val/
"""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from torchvision.datasets.imagenet import META_FILE

from .errors import DatasetLayoutError
from .sources.class_folders import Sample, default_classes, image_files, index_split, subfolders
from .sources.shards import ShardSplit, holds_shards, read_eval_shards
from .sources.layout import WHOLE_DOWNLOADS, detect_layout, source_eval_set
from .sources.val_labels import DEVKIT_ARCHIVE, KAGGLE_SOLUTION, find_label_file, labels_from

EVAL_LAYOUTS = ("expected class folders (DIR/<wnid>/*.JPEG), ImageNetV2's numbered folders (DIR/0 .. DIR/999), "
                "or a flat folder of ILSVRC2012_val_*.JPEG with its labels")
FLAT_HELP = (f"a flat folder of ILSVRC2012_val_*.JPEG needs its labels: --devkit {DEVKIT_ARCHIVE} (or the "
             f"{META_FILE} torchvision writes from it) or --val-solution {KAGGLE_SOLUTION}, or rearrange it "
             f"into class folders with: python -m data.val_layouts arrange")


@dataclass
class EvalSet:
    samples: List[Sample]
    classes: List[str]  # class names in label order (wnids, or '0'..'999' for ImageNetV2)
    layout: str  # class-folders | imagenetv2 | flat-devkit | flat-kaggle | shards | archives | kaggle | kaggle-zip
    shards: Optional[ShardSplit] = None  # where each sample lies, for shards and archives


def flat_images(folder: Path) -> List[Path]:
    return [folder / name for name in image_files(folder)]


SPLIT_NAMES = ("train", "val", "validation", "test")  # subfolders that mark a dataset root


def eval_folder(root: Path, split: str) -> Path:
    """The folder to evaluate: root/<split> if it exists, else root itself (class folders,
    ImageNetV2's numbered folders, a flat folder), unless root is plainly a dataset root
    (it holds train/, val/, validation/ or test/) that lacks the split."""
    root = Path(root)
    if detect_layout(root) in WHOLE_DOWNLOADS:
        return root  # ImageNet's archives or Kaggle's download: find_eval_set reads its validation images
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
    """The validation images of ImageNet's archives or Kaggle's download, the tar shards of
    `split` in `folder` if it holds them, else read_eval_set. Shards that do not name their
    classes take the model's: its checkpoint's, else default_classes."""
    layout = detect_layout(folder)
    if layout in WHOLE_DOWNLOADS:
        samples, classes, split_found = source_eval_set(layout, folder, index_dir)
        return EvalSet(samples, classes, layout, split_found)
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
