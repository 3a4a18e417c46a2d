"""Index an ImageNet-layout folder and read its images as RGB."""
import hashlib
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetLayoutError
from ..fast_decode import DECODE_ERRORS, ImageTransform
from ..loader_faults import ReadProgress
from ..sample_index import Sample, SampleIndex, absolute, cached


# Pillow opens every one of these; the comparison ignores case (ImageNet uses .JPEG).
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

EXPECTED_LAYOUT = """expected one of these layouts:
    class folders:        DIR/train/<wnid>/*.JPEG (one folder per WordNet id, classes in sorted order)
                          and DIR/val/<wnid>/*.JPEG, or a flat DIR/val/ with its labels beside it
    tar shards:           DIR/<name>-train-NNNN.tar and DIR/<name>-validation-NN.tar (WebDataset tar shards,
                          docs/shards.md)
    ImageNet's archives:  DIR/ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz
    Kaggle's download:    its zip, or DIR/ILSVRC/Data/CLS-LOC/ with DIR/LOC_val_solution.csv (docs/archives.md)"""


SUFFIXES = frozenset(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)


def image_files(folder: Path) -> List[str]:
    """The image file names in a folder, sorted. os.scandir gets file types from the
    directory listing itself: no stat per file, which matters for 1.28M files on NFS."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if is_image_name(e.name) and is_file_entry(e))


def is_image_name(name: str) -> bool:
    """The rule that picks a folder's images, for archives' members too: an image extension,
    no dot-file."""
    return name[:1] != "." and "." in name and name.rpartition(".")[2].lower() in SUFFIXES


def is_file_entry(entry: os.DirEntry) -> bool:
    """A file, or a symbolic link that leads to no folder: a dangling link or a loop of links
    is listed like a broken file, so that reading it fails and is counted as unreadable."""
    try:
        return entry.is_file() or (entry.is_symlink() and not entry.is_dir())
    except OSError:  # a loop of links: "too many levels of symbolic links"
        return True


def subfolders(folder: Path) -> List[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and is_folder_entry(e))


def is_folder_entry(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError as exc:  # a loop of links where a class folder would be: its images cannot be known
        raise DatasetLayoutError(f"{entry.path} cannot be followed ({exc.strerror}): fix or remove the link") from None


def find_classes(split_dir: Path) -> List[str]:
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"{split_dir} does not exist or is not a folder; {EXPECTED_LAYOUT}")
    classes = subfolders(split_dir)
    if not classes:
        loose = len(image_files(split_dir))
        hint = (f" It holds {loose} image files directly: a flat folder, not class folders. Put its labels beside "
                f"it (ILSVRC2012_devkit_t12.tar.gz or Kaggle's LOC_val_solution.csv), or arrange it into class "
                f"folders: python -m data.val_layouts arrange --help.") if loose else ""
        raise DatasetLayoutError(f"{split_dir} has no class folders.{hint} {EXPECTED_LAYOUT}")
    return classes


def index_split(split_dir: Path, classes: Sequence[str]) -> List[Sample]:
    """Every image under split_dir/<class>/, labelled by the class's position in `classes`."""
    folders, files = list_split(split_dir, classes)
    return [(f"{folder}/{name}", target) for target, (folder, names) in enumerate(zip(folders, files))
            for name in names]


def list_split(split_dir: Path, classes: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """Each class's folder, and its image files in order."""
    present = find_classes(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DatasetLayoutError(
            f"{split_dir} has {len(unknown)} class folders that the training classes lack, "
            f"e.g. {unknown[:3]}; {EXPECTED_LAYOUT}"
        )
    files = [image_files(split_dir / name) if (split_dir / name).is_dir() else [] for name in classes]
    empty = [name for name, found in zip(classes, files) if not found]
    if empty:
        raise DatasetLayoutError(
            f"{split_dir}: {len(empty)} of {len(classes)} classes have no images "
            f"(missing or empty folders, e.g. {empty[:3]}); {EXPECTED_LAYOUT}"
        )
    return [str(split_dir / name) for name in classes], files


# What decides which files a listing keeps (extensions, hidden files, links): a cache made
# under another rule is built again.
LISTING_RULE = "2: IMAGE_EXTENSIONS, no dot-files, links that lead nowhere kept; absolute paths"
RACY_NS = 2_000_000_000  # a folder changed this close to its listing may have changed unseen


def cached_index(split_dir: Path, classes: Sequence[str], index_dir: str = "") -> SampleIndex:
    """list_split's samples as a SampleIndex, cached (sample_index.cached) for every later
    start, rank and worker, and listed again when a folder changed since: adding or removing
    a file changes its class folder's modification time; adding or removing a class, the
    split folder's. A folder changed within RACY_NS of the listing may have changed unseen."""
    split_dir = absolute(split_dir)
    times = folder_times(split_dir, classes)
    key = [LISTING_RULE, str(split_dir), list(classes), times]

    def build():
        built_ns = time.time_ns()
        folders, files = list_split(split_dir, classes)
        return SampleIndex.from_names(folders, files, range(len(classes))), {"built_ns": built_ns}, key

    return cached(str(split_dir), split_dir.parent, f"{split_dir.name}.idx", key, build, index_dir,
                  fresh=lambda extra: max(times) < extra["built_ns"] - RACY_NS)[0]


def folder_times(split_dir: Path, classes: Sequence[str]) -> List[int]:
    """The modification times of split_dir and of each class folder (-1: missing)."""
    def mtime(folder: Path) -> int:
        try:
            return os.stat(folder).st_mtime_ns
        except OSError:
            return -1

    return [mtime(split_dir)] + [mtime(split_dir / name) for name in classes]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on all three numbers, so augmentation is reproducible."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    mixed ^= mixed >> 31
    return mixed & (2**63 - 1)


@contextmanager
def seeded_randomness(seed: int, numpy: bool = True) -> Iterator[None]:
    """Seed torch's, Python's and (if `numpy`) NumPy's global generators for one sample.

    torchvision and timm augmentations (crop, flip, RandAugment) draw from these globals;
    seeding them per sample makes each image's augmentation a function of (seed, epoch,
    index), independent of which worker process draws it. In the main process (workers=0)
    the generators are restored afterwards, since training draws from them too; a loader
    worker has no other use for them and skips that. NumPy is left alone unless the
    transform draws from it: saving and restoring its state costs ~70 us, more than all
    the rest together. torch.default_generator, not torch.manual_seed, which also queues
    CUDA seeding at ~80 us a call.
    """
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state() if numpy else None
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    if numpy:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            if numpy:
                np.random.set_state(saved[2])


class ImageFolderDataset(Dataset):
    """Samples (path, target) -> (image, target, index, error).

    An item is looked up by index, or by (epoch, index) for training: the training sampler
    passes the epoch along so that per-sample randomness survives persistent workers.
    A file that cannot be read or decoded gives image None and the reason, so that one bad
    JPEG costs one sample, not the run; the loader's collate drops it and counts it.
    `read` is the one thing a dataset of another storage changes (shards.ShardDataset).
    """

    def __init__(self, samples: Sequence[Sample], classes: List[str], transform: ImageTransform,
                 seed: Optional[int] = None):
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.seed = seed
        self.progress: Optional[ReadProgress] = None  # set by the loader that reads it (data.loaders.tracked)

    def __len__(self) -> int:
        return len(self.samples)

    def known_unreadable(self) -> Dict[int, str]:
        """{sample: why} of the samples known to be unreadable before any is read (none here)."""
        return {}

    def read(self, index: int) -> bytes:
        """The sample's file, whole: one open and one read."""
        with open(self.samples[index][0], "rb") as handle:
            return handle.read()

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        target = self.samples[index][1]
        randomness = nullcontext() if self.seed is None else \
            seeded_randomness(sample_seed(self.seed, epoch, index), self.transform.uses_numpy_random)
        transform = self.transform.at(epoch)
        with randomness, self.progress.reading(index) if self.progress is not None else nullcontext():
            try:
                decoded = transform.decode(self.read(index))
            except DECODE_ERRORS as exc:
                return None, target, index, f"{type(exc).__name__}: {exc}"
            return transform.finish(decoded), target, index, None


def build_imagenet_splits(
    root: str, train_transform: ImageTransform, eval_transform: ImageTransform, seed: int,
    holdout_fraction: float = 0.0, index_dir: str = "",
) -> Tuple[ImageFolderDataset, ImageFolderDataset]:
    """Training and evaluation sets: train/ and val/, or (holdout_fraction > 0) train/ split in two."""
    if not root:
        raise DatasetLayoutError(f"no dataset folder given: pass --data-dir DIR or data.dir=DIR; {EXPECTED_LAYOUT}")
    root_dir = Path(root).expanduser()
    if not root_dir.is_dir():
        raise DatasetLayoutError(f"dataset folder {root_dir} does not exist; {EXPECTED_LAYOUT}")
    classes = find_classes(root_dir / "train")
    train_samples = cached_index(root_dir / "train", classes, index_dir)
    if holdout_fraction > 0:
        train_samples, val_samples = (SampleIndex.from_samples(part)
                                      for part in hold_out(train_samples, classes, holdout_fraction, seed))
    elif (root_dir / "val").is_dir():
        val_samples = cached_index(root_dir / "val", classes, index_dir)
    else:
        raise DatasetLayoutError(f"{root_dir / 'val'} does not exist: add it with the same class folders as train/, "
                                 f"or set data.holdout_fraction (e.g. 0.1) to evaluate on that fraction of each class "
                                 f"of train/, held out from training; {EXPECTED_LAYOUT}")
    train = ImageFolderDataset(train_samples, classes, train_transform, seed=seed)
    val = ImageFolderDataset(val_samples, classes, eval_transform)
    return train, val


def hold_out(samples: List[Sample], classes: Sequence[str], fraction: float,
             seed: int) -> Tuple[List[Sample], List[Sample]]:
    """(kept, held out): round(fraction x n) of each class's n images held out, at least one,
    never all. An image is held out when its hash of (seed, class folder, file name) is
    among its class's lowest, so the split is a function of those alone: the same on every
    rank, on resume and wherever the dataset is mounted, and a file added later moves at
    most one other image across."""
    def rank(sample: Sample) -> bytes:
        path = Path(sample[0])
        return hashlib.sha256(f"{seed}/{path.parent.name}/{path.name}".encode()).digest()

    by_class: List[List[Sample]] = [[] for _ in classes]
    for sample in samples:
        by_class[sample[1]].append(sample)
    held = set()
    for name, members in zip(classes, by_class):
        if len(members) < 2:
            raise DatasetLayoutError(f"class {name} has {len(members)} image(s) in train/: data.holdout_fraction "
                                     f"needs at least 2 in each class (one to train on, one to hold out)")
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held.update(path for path, _ in sorted(members, key=rank)[:count])
    return [s for s in samples if s[0] not in held], [s for s in samples if s[0] in held]


def default_classes(num_classes: int) -> List[str]:
    """For a set that does not name its classes (timm's shards, timm's weights): ImageNet's
    1000 WordNet ids in timm's order for a 1000-class set, else the class numbers."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    return [str(i) for i in range(num_classes)]
