"""Which source a --data-dir holds (data.layout, or auto), and what validate.py and the
datasets need whichever it is. The sources themselves: data/sources/__init__.py."""
from pathlib import Path
from typing import List, Optional, Tuple

from .archives import build_archive_splits, holds_archives, read_val
from .class_folders import Sample
from .kaggle import build_kaggle_splits, kaggle_eval_set, kaggle_root
from .kaggle_zip import ZipDataset, build_zip_splits, find_zip, read_zip_split
from .shards import ShardDataset, ShardSplit, build_shard_splits, holds_shards

NAMES = {"class-folders": "class folders", "shards": "tar shards", "archives": "ImageNet's official archives",
         "kaggle": "Kaggle's download (unzipped)", "kaggle-zip": "Kaggle's zip"}
WHOLE_DOWNLOADS = ("archives", "kaggle", "kaggle-zip")  # sources that hold both splits and the labels
# each source but class folders (data/loaders.py: they alone may hold out a validation set):
# (root, train transform, eval transform, seed, index_dir) -> (train set, validation set)
SPLIT_BUILDERS = {"shards": build_shard_splits, "archives": build_archive_splits, "kaggle": build_kaggle_splits,
                  "kaggle-zip": build_zip_splits}


def detect_layout(root: Path, layout: str = "auto") -> str:
    """data.layout, or (auto) the source `root` holds; class folders when it holds none.
    Class folders beside the archives (arranged from them) are read rather than the archives."""
    if layout == "kaggle":
        return "kaggle-zip" if find_zip(root) else "kaggle"
    if layout != "auto":
        return layout
    download = download_layout(root)
    if download in ("kaggle-zip", "kaggle"):
        return download
    if (root / "train").is_dir():
        return "class-folders"
    return download or ("shards" if holds_shards(root) else "class-folders")


def download_layout(root: Path) -> Optional[str]:
    """Which of ImageNet's downloads `root` holds, whatever else is beside it; None if none."""
    if find_zip(root):
        return "kaggle-zip"
    if kaggle_root(root):
        return "kaggle"
    return "archives" if holds_archives(root) else None


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
