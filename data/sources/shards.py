"""Training and evaluation from WebDataset tar shards, by random access.

    DIR/imagenet1k-train-0000.tar ... -1023.tar     timm's imagenet-1k-wds layout: each sample
    DIR/imagenet1k-validation-00.tar ... -63.tar    is <key>.jpg + <key>.cls (the class index),
    DIR/_info.json                                  with the split sizes (optional here)

Sample i is read at its known offset in its shard, so everything built on an index works
as it does on class folders: the sampler, the per-sample crop draws, exact mid-epoch
resume, unreadable-image counting, the fast and GPU decode paths. Sample i is also the
class-folder dataset's sample i (sorted classes, then sorted file names), however the
packer (data/pack_shards.py) shuffled the samples across shards: training from shards
gives the same weights as training from the folders they were packed from.

The index of each sample's place in its shard is data/sources/shard_index.py's.

Each process (each loader worker) opens a shard on first use and keeps it open: one
open() per shard per worker, then one pread() per image.

Why not webdataset's indexed reader, `wids` (BSD-3; not a dependency here):
ShardListDataset copies ("downloads") every shard into a local cache folder first, keeps
at most `cache_size` shards open (10 by default, evicting and re-opening under random
access over ImageNet's 1,024), re-indexes a shard each time it opens it instead of
keeping an index that survives the process, numbers samples in shard order (not the
class folders' order, so no bitwise parity with them), asserts where we need a message
and a skipped, counted sample, and prints to stderr. What we need from it is small:
random access by offset, which a tar header scan and os.pread give directly.
"""
import json
import logging
import os
import resource
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import DatasetLayoutError, SourceChangedError
from ..fast_decode import ImageTransform
from .class_folders import ImageFolderDataset, default_classes
from ..sample_index import SampleIndex, absolute, cached, identity
from .shard_index import ShardScan, index_file, indexed_shards, member_key, shard_split, split_names

log = logging.getLogger(__name__)

INFO_NAME = "_info.json"  # timm's: split sizes, shard file names; ours adds the class names
SHARD_LAYOUT = """expected WebDataset tar shards as timm publishes ImageNet:
    DIR/<name>-train-NNNN.tar          each sample a <key>.jpg and a <key>.cls (class index)
    DIR/<name>-validation-NN.tar       (or -val-); python -m data.pack_shards makes them
    DIR/_info.json                     optional: split sizes, class names"""


class BadShardSample(OSError):
    """A sample the shards cannot give: the dataset reports it as unreadable (skipped, counted)."""


def find_shards(folder: Path, split: str) -> List[Path]:
    """The split's shards in `folder`, in number order; [] if it has none."""
    if not folder.is_dir():
        return []
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            parts = shard_split(entry.name)
            if parts and parts[1] in split_names(split) and entry.is_file():
                found[entry.name] = parts
    prefixes = sorted({(prefix, name) for prefix, name, _ in found.values()})
    if len(prefixes) > 1:
        sets = ", ".join(f"{prefix}-{name}-*.tar" for prefix, name in prefixes)
        raise DatasetLayoutError(f"{folder} holds {split} shards of {len(prefixes)} sets ({sets}): keep one per folder")
    numbers = sorted(number for _, _, number in found.values())
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers)) if numbers else []
    if missing:
        log.warning("%s: the %s shards skip number(s) %s: missing shards?", folder, split, missing[:5])
    return [folder / name for name in sorted(found, key=lambda n: found[n][2])]


def holds_shards(folder: Path, split: str = "train") -> bool:
    return bool(find_shards(folder, split))


# ----------------------------------------------------------------------------- a split


@dataclass
class ShardSplit:
    """A split's samples in the class folders' order, and where each one lies."""

    paths: List[str]  # the shards
    stats: List[Tuple[int, int, int]]  # each shard's identity (sample_index.identity) when indexed; -1s: gone
    # ("<shard>/<member>", class), the name that warnings and reports show: the index's
    # folders are the shards, and its arrays `offset` and `size` say where each image lies
    samples: SampleIndex
    problems: Dict[int, str]  # sample -> why it cannot be read (known when indexing)
    classes: Optional[List[str]] = None  # the class names, where the index holds them (Kaggle's zip)

    @property
    def shard(self) -> np.ndarray:  # sample -> position in `paths`
        return self.samples.folder_of

    @property
    def offset(self) -> np.ndarray:
        return self.samples.arrays["offset"]

    @property
    def size(self) -> np.ndarray:
        return self.samples.arrays["size"]


def sort_key(name: str) -> str:
    """Orders member names as the class folders order their files: the folder dataset
    sorts '<stem>.<ext>', which is the order of '<stem>.' since a stem has no dot."""
    return member_key(name)[0] + "."


def build_split(scans: Dict[str, ShardScan], folder: Path) -> ShardSplit:
    names = sorted(scans, key=lambda name: shard_split(name)[2])
    rows = []  # (class, order key, shard, position)
    for shard, name in enumerate(names):
        scan = scans[name]
        rows.extend((scan.classes[i], sort_key(scan.names[i]), shard, i) for i in range(len(scan.names)))
    # Samples with a class in the folders' order; those without one (no readable .cls) at the end.
    rows.sort(key=lambda row: (row[0] < 0, row[0], row[1], row[2], row[3]))
    known = {(shard, position): reason for shard, name in enumerate(names)
             for position, reason in scans[name].problems}
    gone = {shard for shard, name in enumerate(names) if scans[name].size < 0}
    problems = {}
    for index, (_, _, shard, position) in enumerate(rows):
        if shard in gone:
            problems[index] = f"shard {names[shard]} is gone: deleted or moved after it was indexed"
        elif known and (shard, position) in known:
            problems[index] = known[(shard, position)]
    paths = [str(folder / name) for name in names]
    samples = SampleIndex.from_rows(
        paths, [row[2] for row in rows], [scans[names[shard]].names[position] for _, _, shard, position in rows],
        [row[0] for row in rows],
        offset=np.array([scans[names[row[2]]].offsets[row[3]] for row in rows], dtype=np.int64),
        size=np.array([scans[names[row[2]]].sizes[row[3]] for row in rows], dtype=np.int64))
    return ShardSplit(paths, [(scans[name].size, scans[name].mtime_ns, scans[name].ctime_ns) for name in names],
                      samples, problems)


def read_split(folder: Path, split: str, index_dir: str = "") -> ShardSplit:
    """The split's shards in `folder`, indexed: the split as a whole from its compact cache
    when no shard changed (no per-shard scan is read), else from the per-shard scans (from
    their cache where a shard is unchanged), and then cached whole; one process builds it
    while the others wait."""
    folder = absolute(folder)
    paths = find_shards(folder, split)
    if not paths:
        raise DatasetLayoutError(f"{folder} has no {split} shards; {SHARD_LAYOUT}")
    scan_cache = index_file(folder, index_dir)

    def build():
        scans = indexed_shards(paths, scan_cache)
        count_lost(scans, info_lengths(folder, split))
        built = build_split(scans, folder)
        return built.samples, dict(stats=built.stats, problems=built.problems), split_key(folder, paths, scan_cache)

    samples, extra = cached(f"the {split} shards in {folder}", folder, f"shards-{split}.idx",
                            split_key(folder, paths, scan_cache), build, index_dir)
    shards = ShardSplit(samples.folders, [tuple(stat) for stat in extra["stats"]], samples,
                        {int(index): reason for index, reason in extra["problems"].items()})
    if not len(shards.samples):
        raise DatasetLayoutError(f"the {split} shards in {folder} hold no samples; {SHARD_LAYOUT}")
    check_info(folder, split, shards)
    if shards.problems:
        index, reason = next(iter(sorted(shards.problems.items())))
        log.warning("%d of the %d %s samples in %s cannot be read and will be skipped and counted as unreadable, "
                    "e.g. %s: %s", len(shards.problems), len(shards.samples), split, folder,
                    shards.samples[index][0], reason)
    return shards


def split_key(folder: Path, paths: List[Path], scan_cache: Path) -> List:
    """What a split's compact cache must match: each shard's name and identity, _info.json's,
    and the scans' cache's that it was built from."""
    def stat(path: Path) -> List:
        try:
            return [path.name, *identity(path.stat())]
        except FileNotFoundError:
            return [path.name, -1, -1, -1]

    return [stat(path) for path in paths] + [stat(folder / INFO_NAME), stat(scan_cache)]


def read_info(folder: Path) -> Dict:
    try:
        return json.loads((folder / INFO_NAME).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", folder / INFO_NAME, exc)
        return {}


def info_lengths(folder: Path, split: str) -> Dict[str, int]:
    """_info.json's sample count of each of the split's shards, by file name; {} if it gives none."""
    splits = read_info(folder).get("splits")
    splits = splits if isinstance(splits, dict) else {}
    info = next((splits[name] for name in split_names(split) if isinstance(splits.get(name), dict)), {})
    names, lengths = info.get("filenames", ()), info.get("shard_lengths", ())
    if not isinstance(names, list) or not isinstance(lengths, list) or len(names) != len(lengths):
        return {}
    return {name: length for name, length in zip(names, lengths) if isinstance(length, int)}


def check_info(folder: Path, split: str, shards: ShardSplit) -> None:
    """Warn where _info.json's shard sizes disagree with what the shards hold."""
    lengths = info_lengths(folder, split)
    held = np.bincount(shards.shard, minlength=len(shards.paths))
    counts = {Path(path).name: int(n) for path, n in zip(shards.paths, held)}
    differ = [f"{name} ({counts.get(name, 'missing')}, not {length})"
              for name, length in lengths.items() if counts.get(name) != length]
    if differ:
        log.warning("%s: %d shard(s) hold other sample counts than %s says: %s", folder, len(differ), INFO_NAME,
                    ", ".join(differ[:3]))


def count_lost(scans: Dict[str, ShardScan], lengths: Dict[str, int]) -> None:
    """Name each shard cut short, and count what it lost. The index kept the samples after
    the cut where it had seen them whole; else _info.json's count of the shard's samples
    gives the number lost, added as placeholders (class unknown: placed last), each one
    unreadable; else the number is unknown, and the warning says so."""
    for name, scan in sorted(scans.items()):
        if not scan.damage:
            continue
        if scan.lost is None and name in lengths:
            add_placeholders(scan, name, lengths[name])
        if scan.size < 0:
            continue  # gone: indexed_shards has said so
        if scan.lost is None:
            log.warning("%s. The number of samples lost after the cut is unknown: the shard was not indexed whole "
                        "before, and %s gives no sample count for it, so only its cut sample is counted as "
                        "unreadable; copy the shard again from its source", scan.damage, INFO_NAME)
        else:
            log.warning("%s; %d sample(s) after the cut will be skipped and counted as unreadable; copy the shard "
                        "again from its source", scan.damage, scan.lost)


def add_placeholders(scan: ShardScan, name: str, length: int) -> None:
    """The samples _info.json counts in a cut shard beyond what its headers still show."""
    found, missing = len(scan.names), max(0, length - len(scan.names))
    reason = (f"lost: {name} is cut short at byte {scan.size}; {INFO_NAME} says it holds {length} samples, its "
              f"tar headers show {found}")
    for number in range(missing):
        scan.names.append(f"<lost sample {number + 1:0{len(str(missing))}d} of {missing}>")
        scan.offsets.append(0)
        scan.sizes.append(0)
        scan.classes.append(-1)
        scan.problems.append((len(scan.names) - 1, reason))
    scan.lost = missing


def named_classes(folder: Path) -> Optional[List[str]]:
    """The class names in _info.json (ours writes them; timm's has none)."""
    names = read_info(folder).get("classes")
    return names if isinstance(names, list) and names and all(isinstance(n, str) for n in names) else None


# ----------------------------------------------------------------------------- reading


class OpenShards:
    """This process's open shard files: a shard is opened on first use and stays open, so
    a loader worker opens each shard once, then reads each image with one pread().

    The descriptors belong to the process that opened them: a forked loader worker starts
    with none of its own. pread() has no shared file position, so nothing depends on
    which process reads. Where the open-file limit is below the number of shards even
    after raising the soft limit to the hard one, the least recently used shard is closed.
    """

    def __init__(self, paths: List[str], stats: List[Tuple[int, int, int]]):
        self.paths = paths
        self.stats = stats
        self.files: "OrderedDict[int, int]" = OrderedDict()
        self.owner = -1  # the process the descriptors belong to
        self.capacity = len(paths)
        self.opened = 0  # open() calls in this process (benchmarks.shards reports it)

    def __getstate__(self) -> Dict:
        return dict(self.__dict__, files=OrderedDict(), owner=-1)

    def _descriptor(self, shard: int) -> int:
        if self.owner != os.getpid():
            self.files, self.owner, self.opened = OrderedDict(), os.getpid(), 0
            self.capacity = open_file_capacity(len(self.paths))
        if shard in self.files:
            self.files.move_to_end(shard)
            return self.files[shard]
        path = self.paths[shard]
        if self.stats[shard][0] < 0:
            raise BadShardSample(f"shard {Path(path).name} is gone: deleted or moved after it was indexed")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BadShardSample(f"shard {path} is gone: deleted or moved after it was indexed") from None
        self.opened += 1
        if len(self.files) >= self.capacity:
            os.close(self.files.popitem(last=False)[1])
        self.files[shard] = fd
        return fd

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """The bytes at `offset`, once the file is seen to be the one indexed (an fstat, about
        a microsecond: every read, since a loader worker keeps its files open all run)."""
        fd = self._descriptor(shard)
        if identity(os.fstat(fd)) != tuple(self.stats[shard]):
            raise SourceChangedError(f"{self.paths[shard]} changed after it was indexed (its size, modification or "
                                     f"change time): its offsets are stale; restart the run to index it again")
        data = os.pread(fd, size, offset)
        while len(data) < size:
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise BadShardSample(f"cut short: shard {self.paths[shard]} ends at byte {offset + len(data)}, "
                                     f"inside this member (bytes {offset} to {offset + size})")
            data += more
        return data


def open_file_capacity(shards: int) -> int:
    """How many shards this process may keep open: raises the soft open-file limit to the
    hard one if the shards need it, leaving room for everything else a process opens."""
    spare = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < shards + spare and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = shards + spare if hard == resource.RLIM_INFINITY else min(hard, shards + spare)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    capacity = shards if soft == resource.RLIM_INFINITY else max(1, min(shards, soft - spare))
    if capacity < shards:
        log.warning("the open-file limit (ulimit -n %d) is too low to keep all %d shards open: shards will be "
                    "reopened; raise the hard limit", soft, shards)
    return capacity


class ShardDataset(ImageFolderDataset):
    """ImageFolderDataset whose samples lie inside tar shards: only `read` differs."""

    def __init__(self, shards: ShardSplit, classes: List[str], transform: ImageTransform, seed: Optional[int] = None):
        super().__init__(shards.samples, classes, transform, seed)
        self.shards = shards
        self.files = OpenShards(shards.paths, shards.stats)

    def known_unreadable(self) -> Dict[int, str]:
        return self.shards.problems

    def read(self, index: int) -> bytes:
        problem = self.shards.problems.get(index)
        if problem is not None:
            raise BadShardSample(problem)
        return self.files.read(int(self.shards.shard[index]), int(self.shards.offset[index]),
                               int(self.shards.size[index]))


# ----------------------------------------------------------------------------- the training and evaluation sets


def check_targets(shards: ShardSplit, classes: List[str], where: str) -> None:
    highest = int(shards.samples.targets.max())
    if highest >= len(classes):
        raise DatasetLayoutError(f"{where} hold class index {highest}, but there are {len(classes)} classes "
                                 f"(0..{len(classes) - 1})")


def build_shard_splits(root: Path, train_transform: ImageTransform, eval_transform: ImageTransform, seed: int,
                       index_dir: str = "") -> Tuple[ShardDataset, ShardDataset]:
    """Training and validation sets from the shards in `root`, told apart by name."""
    train = read_split(root, "train", index_dir)
    val = read_split(root, "validation", index_dir)
    classes = named_classes(root) or default_classes(int(train.samples.targets.max()) + 1)
    check_targets(train, classes, f"the train shards in {root}")
    check_targets(val, classes, f"the validation shards in {root}")
    return ShardDataset(train, classes, train_transform, seed=seed), ShardDataset(val, classes, eval_transform)


def read_eval_shards(folder: Path, split: str, model_classes: List[str], index_dir: str = "") -> Tuple[ShardSplit, List[str]]:
    """An evaluation split and its class names: _info.json's, else the model's (validate.py)."""
    shards = read_split(folder, split, index_dir)
    classes = named_classes(folder) or model_classes
    check_targets(shards, classes, f"the {split} shards in {folder}")
    return shards, classes
