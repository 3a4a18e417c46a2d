"""Every source of ImageNet that a --data-dir may hold, one row each, and the one place that
chooses among them, for training and for evaluation:

    class-folders   DIR/train/<wnid>/, DIR/val/<wnid>/                   folders.py
    shards          DIR/<name>-train-NNNN.tar, -validation-NN.tar         tars.py
    archives        DIR/ILSVRC2012_img_{train,val}.tar + devkit           archives.py
    kaggle          Kaggle's download unzipped (train/ and a flat val/)   kaggle.py
    kaggle-zip      Kaggle's zip itself                                   kaggle.py

A row says how to tell that a folder holds its source, how to build the source's training and
validation indexes, and, for a download that carries its own validation images, how to build
that set for validate.py (labelling flat images by the labels the download carries: labels.py).
Every source gives its samples in the class folders' order, in one index type
(data/sample_index.py) that the one dataset reads (data/dataset.py), so the samplers, the
decode paths and exact resume never learn which one they read. A sixth source is one module
and one row here (docs/adding-a-source.md).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

from common.errors import DataConfigError

from ..config import DataConfig
from ..sample_index import Sample, SampleIndex
from . import archives, folders, kaggle, tars

Splits = Tuple[SampleIndex, SampleIndex, List[str]]  # the training and validation indexes, the classes


@dataclass(frozen=True)
class Source:
    layout: str  # its name, as data.layout and validate.py's "layout" give it
    described: str  # in words, for messages
    holds: Callable[[Path], bool]  # whether --data-dir holds it
    splits: Callable[[Path, DataConfig, int], Splits]  # (root, the data section, seed)
    evaluation: Optional[Callable[[Path, str], Tuple[SampleIndex, List[str], str]]] = None  # (root, index_dir)


# In the order a folder is recognised: class folders arranged beside the archives are read
# rather than the archives.
SOURCES = (
    Source("kaggle-zip", "Kaggle's zip", lambda root: kaggle.find_zip(root) is not None, kaggle.zip_splits,
           kaggle.zip_evaluation),
    Source("kaggle", "Kaggle's download (unzipped)", lambda root: kaggle.tree_root(root) is not None,
           kaggle.tree_splits, kaggle.tree_evaluation),
    Source("class-folders", "class folders", folders.holds, folders.splits),
    Source("archives", "ImageNet's official archives", archives.holds, archives.splits, archives.evaluation),
    Source("shards", "tar shards", tars.holds, tars.splits),
)
BY_LAYOUT = {source.layout: source for source in SOURCES}


class EvalSet(NamedTuple):
    samples: Sequence[Sample]  # a SampleIndex, or a list of (path, class) for a folder's images
    classes: List[str]  # in label order (wnids, or '0'..'999' for ImageNetV2)
    layout: str  # class-folders | imagenetv2 | flat-devkit | flat-kaggle | shards | archives | kaggle | kaggle-zip
    folder: Path  # what was evaluated: the download, or the folder of the split


def source_of(root: Path, layout: str = "auto") -> Source:
    """data.layout's source (kaggle: the zip, or the tree), or (auto) the one `root` holds;
    class folders when it holds none."""
    if layout == "kaggle":
        return BY_LAYOUT["kaggle-zip" if kaggle.find_zip(root) else "kaggle"]
    if layout != "auto":
        return BY_LAYOUT[layout]
    return next((source for source in SOURCES if source.holds(root)), BY_LAYOUT["class-folders"])


def download_of(root: Path) -> Optional[Source]:
    """Which of ImageNet's downloads `root` holds, whatever else is beside it; None if none."""
    return next((source for source in SOURCES if source.evaluation is not None and source.holds(root)), None)


def training_splits(config: DataConfig, seed: int) -> Splits:
    """The training and validation indexes of data.dir, as data.layout says or (auto) as found."""
    root = Path(config.dir).expanduser()
    source = source_of(root, config.layout) if config.dir else BY_LAYOUT["class-folders"]
    if config.holdout_fraction > 0 and source.layout != "class-folders":  # the others carry their own
        raise DataConfigError(f"recipe key 'data.holdout_fraction' is {config.holdout_fraction}, but {root} holds "
                              f"{source.described}, which carry their own validation set; set it to 0")
    return source.splits(root, config, seed)


def evaluation_set(root: Path, split: str = "val", label_file: Optional[Path] = None,
                   model_classes: Sequence[str] = (), index_dir: str = "") -> EvalSet:
    """validate.py's set: a download's own validation images; else root/<split> (or root):
    tar shards of the split, class folders, ImageNetV2's numbered folders or a flat folder
    with its labels. Shards that do not name their classes take the model's."""
    source = source_of(root)
    if source.evaluation is not None:
        return EvalSet(*source.evaluation(root, index_dir), root)
    folder = folders.eval_folder(root, split)
    if folder.is_dir() and not folders.subfolders(folder) and tars.holds(folder, split):
        return EvalSet(*tars.evaluation(folder, split, list(model_classes), index_dir), folder)
    return EvalSet(*folders.evaluation(folder, label_file), folder)
