"""Which source a --data-dir is, and the readers of each.

    class-folders   DIR/train/<wnid>/, DIR/val/<wnid>/             data/imagenet.py
    shards          DIR/<name>-train-NNNN.tar, -validation-NN.tar   data/shards.py
    archives        DIR/ILSVRC2012_img_{train,val}.tar + devkit     data/archives.py
    kaggle          Kaggle's download unzipped (train/ and a flat val/)  data/kaggle.py
    kaggle-zip      Kaggle's zip itself                              data/kaggle_zip.py

Each gives its samples in the class folders' order and the bytes of sample i, so the
samplers, the decode paths and exact resume never learn which one they read.
"""
from pathlib import Path
from typing import List, Optional, Tuple

from .archives import holds_archives, read_val
from .imagenet import Sample
from .kaggle import kaggle_eval_set, kaggle_root
from .kaggle_zip import ZipDataset, find_zip, read_zip_split
from .shards import ShardDataset, ShardSplit, holds_shards

NAMES = {"class-folders": "class folders", "shards": "tar shards", "archives": "ImageNet's official archives",
         "kaggle": "Kaggle's download (unzipped)", "kaggle-zip": "Kaggle's zip"}
WHOLE_DOWNLOADS = ("archives", "kaggle", "kaggle-zip")  # sources that hold both splits and the labels


def detect_layout(root: Path, layout: str = "auto") -> str:
    """data.layout, or (auto) the source `root` holds; class folders when it holds none."""
    if layout == "kaggle":
        return "kaggle-zip" if find_zip(root) else "kaggle"
    if layout != "auto":
        return layout
    if find_zip(root):
        return "kaggle-zip"
    if kaggle_root(root):
        return "kaggle"
    if (root / "train").is_dir():
        return "class-folders"
    if holds_archives(root):
        return "archives"
    return "shards" if holds_shards(root) else "class-folders"


def source_eval_set(layout: str, root: Path,
                    index_dir: str = "") -> Tuple[List[Sample], List[str], Optional[ShardSplit]]:
    """validate.py's samples, classes and (for an archive) where each sample lies."""
    if layout == "archives":
        split, classes = read_val(root, index_dir)
        return split.samples, classes, split
    if layout == "kaggle-zip":
        split = read_zip_split(find_zip(root), "val", index_dir)
        return split.samples, split.classes, split
    samples, classes = kaggle_eval_set(root)
    return samples, classes, None


def split_dataset(split: ShardSplit, classes: List[str], transform, seed: Optional[int] = None) -> ShardDataset:
    """The dataset that reads a split's samples out of its files (a zip's may be deflated)."""
    kind = ZipDataset if "method" in split.samples.arrays else ShardDataset
    return kind(split, classes, transform, seed)
