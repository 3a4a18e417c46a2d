"""Every source of ImageNet that a --data-dir may hold, one row each (SOURCES), and the one place that chooses
among them, for training and for evaluation. Each gives its samples in the class folders' order as a SampleIndex:
the samplers, decoders and exact resume never learn which one they read (docs/adding-a-source.md)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

from common.errors import DataConfigError, DatasetLayoutError

from ..config import DataConfig
from ..sample_index import Sample, SampleIndex
from . import archives, folders, kaggle, tars

Splits = Tuple[SampleIndex, SampleIndex, List[str]]  # the training and validation indexes, the classes


@dataclass(frozen=True)
class Source:
    layout: str  # its name, as data.layout and validate.py's "layout" give it
    described: str  # in words, for messages
    expects: str  # what --data-dir holds, for the message that lists every layout
    holds: Callable[[Path], bool]  # whether --data-dir holds it
    splits: Callable[[Path, DataConfig, int], Splits]  # (root, the data section, seed)
    evaluation: Optional[Callable[[Path, str], Tuple[SampleIndex, List[str], str]]] = None  # (root, index_dir)


# In the order a folder is recognised: class folders arranged beside the archives win over them.
SOURCES = (
    Source("kaggle-zip", "Kaggle's zip", kaggle.ZIP_EXPECTS, lambda root: kaggle.find_zip(root) is not None,
           kaggle.zip_splits, kaggle.zip_evaluation),
    Source("kaggle", "Kaggle's download (unzipped)", kaggle.TREE_EXPECTS,
           lambda root: kaggle.tree_root(root) is not None, kaggle.tree_splits, kaggle.tree_evaluation),
    Source("class-folders", "class folders", folders.EXPECTS, folders.holds, folders.splits),
    Source("archives", "ImageNet's official archives", archives.EXPECTS, archives.holds, archives.splits,
           archives.evaluation),
    Source("shards", "tar shards", tars.EXPECTS, tars.holds, tars.splits),
)
BY_LAYOUT = {source.layout: source for source in SOURCES}


def layouts() -> Tuple[str, ...]:
    """data.layout's values; kaggle is either of Kaggle's."""
    return ("auto", *BY_LAYOUT)


def expected_layouts() -> str:  # each row in a few words; class folders, what auto falls back to, in full
    rows = ", ".join(f"{source.layout} = {source.described}" for source in SOURCES)
    return f"expected one of {len(SOURCES)} layouts: {rows} (the files of each: docs/adding-a-source.md); " \
           f"class folders are {folders.EXPECTS}"


class EvalSet(NamedTuple):
    samples: Sequence[Sample]  # a SampleIndex, or a list of (path, class) for a folder's images
    classes: List[str]  # in label order (wnids, or '0'..'999' for ImageNetV2)
    layout: str  # class-folders | imagenetv2 | flat-devkit | flat-kaggle | shards | archives | kaggle | kaggle-zip
    folder: Path  # what was evaluated: the download, or the folder of the split


def source_of(root: Path, layout: str = "auto") -> Source:
    """data.layout's source (kaggle: the zip, or the tree), or (auto) the one `root` holds, else class folders."""
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
    if not config.dir:
        raise DatasetLayoutError(f"no dataset folder given: pass --data-dir DIR or data.dir=DIR; {expected_layouts()}")
    source = source_of(root, config.layout)
    if source.layout == "class-folders" and not source.holds(root):  # also what auto falls back to
        raise DatasetLayoutError(no_dataset_in(root))
    if config.holdout_fraction > 0 and source.layout != "class-folders":  # the others carry their own
        raise DataConfigError(f"recipe key 'data.holdout_fraction' is {config.holdout_fraction}, but {root} holds "
                              f"{source.described}, which carry their own validation set; set it to 0")
    return source.splits(root, config, seed)


def no_dataset_in(root: Path) -> str:
    """What `root` is instead, and what to pass: its parent for one split of a dataset (train/, its class folders)."""
    if not root.is_dir():
        return f"dataset folder {root} does not exist; {expected_layouts()}"
    if root.name.lower() in folders.SPLIT_NAMES and ((root.parent / "train").is_dir() or folders.subfolders(root)):
        return f"{root} is one split of a dataset: pass --data-dir {root.parent}, the folder that holds train/"
    held = next((source for source in SOURCES if source.holds(root)), None)  # data.layout named another layout
    if held is not None:
        return f"{root / 'train'} does not exist; {root} holds {held.described} ({held.expects}): set data.layout=auto"
    return f"{root / 'train'} does not exist; {expected_layouts()}"


def evaluation_set(root: Path, split: str = "val", label_file: Optional[Path] = None,
                   model_classes: Sequence[str] = (), index_dir: str = "") -> EvalSet:
    """validate.py's set: a download's own validation images; else root/<split> (or root) as shards (named
    classes, else the model's), class folders, ImageNetV2's numbered folders or a flat folder with labels."""
    source = source_of(root)
    if source.evaluation is not None:
        return EvalSet(*source.evaluation(root, index_dir), root)
    folder = folders.eval_folder(root, split)
    if folder.is_dir() and not folders.subfolders(folder) and tars.holds(folder, split):
        return EvalSet(*tars.evaluation(folder, split, list(model_classes), index_dir), folder)
    return EvalSet(*folders.evaluation(folder, label_file), folder)
