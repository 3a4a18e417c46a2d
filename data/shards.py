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

The index, (shard, offset, size, class, name) per sample, is built once by reading the
tar headers and the small .cls members (no image is read or decoded), cached in a JSON
file beside the shards (or under ~/.cache/cspresnet when that folder is read-only, or in
data.shard_index_dir), and rebuilt for a shard whose size or modification time changed.
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
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import tarfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .fast_decode import ImageTransform
from .imagenet import IMAGE_EXTENSIONS, DatasetLayoutError, ImageFolderDataset, Sample

log = logging.getLogger(__name__)

# <prefix>-<split>-<number>.tar, as timm names them: imagenet1k-train-0000.tar
SHARD_NAME = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<split>[^-]+)-(?P<number>\d+)\.tar$")
EVAL_SPLITS = ("validation", "val")  # timm says validation; either is taken for --split val
INDEX_NAME = "_cspresnet_index.json"  # beside the shards
INDEX_FORMAT = 1
INFO_NAME = "_info.json"  # timm's: split sizes, shard file names; ours adds the class names
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # jpg, jpeg, png, ...
SCAN_THREADS = 16  # shards indexed at once: the scan waits on the filesystem, not the CPU

SHARD_LAYOUT = """expected WebDataset tar shards as timm publishes ImageNet:
    DIR/<name>-train-NNNN.tar          each sample a <key>.jpg and a <key>.cls (class index)
    DIR/<name>-validation-NN.tar       (or -val-); python -m data.pack_shards makes them
    DIR/_info.json                     optional: split sizes, class names"""


class BadShardSample(OSError):
    """A sample the shards cannot give: the dataset reports it as unreadable (skipped, counted)."""


# ----------------------------------------------------------------------------- names


def shard_split(name: str) -> Optional[Tuple[str, str, int]]:
    """(prefix, split, number) of a shard's file name, or None for any other file."""
    match = SHARD_NAME.match(name)
    if not match:
        return None
    return match.group("prefix") or "", match.group("split").lower(), int(match.group("number"))


def split_names(split: str) -> Tuple[str, ...]:
    return EVAL_SPLITS if split.lower() in EVAL_SPLITS else (split.lower(),)


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


def member_key(name: str) -> Tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last part, the
    extension the rest ("a/b.seg.png" -> "a/b", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


# ----------------------------------------------------------------------------- scanning one shard


@dataclass
class ShardScan:
    """What a shard holds, per sample in member order; `problems` by position."""

    size: int
    mtime_ns: int
    names: List[str] = field(default_factory=list)  # the image member's name (the key, if it has none)
    offsets: List[int] = field(default_factory=list)  # where the image's bytes start
    sizes: List[int] = field(default_factory=list)
    classes: List[int] = field(default_factory=list)  # -1: unknown
    problems: List[Tuple[int, str]] = field(default_factory=list)

    def to_json(self) -> Dict:
        return dict(self.__dict__, problems=[list(p) for p in self.problems])

    @classmethod
    def from_json(cls, entry: Dict) -> "ShardScan":
        return cls(**dict(entry, problems=[tuple(p) for p in entry["problems"]]))


Member = Tuple[str, int, int, Optional[bytes]]  # name, data offset, size, the bytes of a .cls member


def read_members(path: Path, size: int) -> Tuple[List[Member], str]:
    """Every file member's name, offset and size from the tar headers, the .cls members'
    bytes, and what is wrong with the archive's end ("" if nothing)."""
    members: List[Member] = []
    with open(path, "rb") as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.ReadError as exc:
            return [], f"not a tar archive ({exc})"
        damage = ""
        try:
            for info in tar:
                if not info.isfile():
                    continue
                value = None
                if member_key(info.name)[1] == "cls" and info.offset_data + info.size <= size:
                    value = tar.extractfile(info).read()
                members.append((info.name, info.offset_data, info.size, value))
        except tarfile.ReadError as exc:  # "unexpected end of data": the last member's bytes are cut
            damage = str(exc)
        handle.seek(tar.offset)
        if not damage and handle.read(512) != bytes(512):  # tar ends with zero blocks; a cut header does not
            damage = f"no end-of-archive marker at byte {tar.offset}"
    if damage:
        last = members[-1][0] if members else "its first member"
        damage = f"{path.name} is cut short or damaged at byte {size} ({damage}): members after {last} are lost"
    return members, damage


def scan_shard(path: Path) -> ShardScan:
    """Index one shard: its samples (consecutive members with one key) with their image
    member and class; a sample without either is kept, with the reason, to be counted."""
    try:
        stat = path.stat()
        members, damage = read_members(path, stat.st_size)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read shard {path}: {exc}") from None
    scan = ShardScan(stat.st_size, stat.st_mtime_ns)
    if damage:
        log.warning("%s", damage)
    groups: List[Tuple[str, List[Member]]] = []
    for member in members:
        key, extension = member_key(member[0])
        if not extension:
            continue  # webdataset skips a name without an extension too
        if groups and groups[-1][0] == key:
            groups[-1][1].append(member)
        else:
            groups.append((key, [member]))
    for position, (key, group) in enumerate(groups):
        add_sample(scan, key, group, stat.st_size, damage if position == len(groups) - 1 else "")
    return scan


def add_sample(scan: ShardScan, key: str, group: List[Member], shard_size: int, damage: str) -> None:
    image = next((m for m in group if member_key(m[0])[1] in IMAGE_MEMBERS), None)
    label = next((m for m in group if member_key(m[0])[1] == "cls"), None)
    target, problem = -1, ""
    if label is None or label[3] is None:
        problem = "no .cls member (its class)" + (f"; {damage}" if damage else "")
    else:
        try:
            target = int(label[3].decode().strip())
            if target < 0:
                raise ValueError
        except ValueError:
            problem = f"its .cls member holds {label[3][:20]!r}, not a class index"
    if image is None:
        others = ", ".join("." + member_key(m[0])[1] for m in group)
        problem = problem or f"no image member (it has {others}; expected .jpg or another image type)"
    elif image[1] + image[2] > shard_size:
        problem = problem or (f"cut short: the shard ends {shard_size - image[1]} bytes into this member's "
                              f"{image[2]}; {damage}")
    scan.names.append(image[0] if image else key)
    scan.offsets.append(image[1] if image else 0)
    scan.sizes.append(image[2] if image else 0)
    scan.classes.append(target)
    if problem:
        scan.problems.append((len(scan.names) - 1, problem))


# ----------------------------------------------------------------------------- the cached index


def index_file(folder: Path, index_dir: str = "") -> Path:
    """Beside the shards if that folder is writable, else in a per-user cache; `index_dir`
    (data.shard_index_dir) decides instead when it is set."""
    folder = folder.resolve()
    tag = f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}.json"
    if index_dir:
        return Path(index_dir).expanduser() / tag
    if os.access(folder, os.W_OK) or (folder / INDEX_NAME).is_file():
        return folder / INDEX_NAME
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cspresnet" / "shard-index" / tag


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One process builds the index while the others (ranks, nodes) wait for it; where the
    filesystem cannot lock, each builds its own (the writes are atomic either way)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def load_index(path: Path) -> Dict[str, Dict]:
    """The cached entries by shard file name; {} when there is none or it cannot be read."""
    try:
        index = json.loads(path.read_text())
        if index.get("format") == INDEX_FORMAT:
            return index["shards"]
        log.warning("the shard index %s is of another format: indexing again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, KeyError) as exc:
        log.warning("the shard index %s cannot be read (%s): indexing again", path, exc)
    return {}


def save_index(path: Path, shards: Dict[str, Dict]) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps({"format": INDEX_FORMAT, "shards": shards}, separators=(",", ":")))
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.warning("could not save the shard index to %s (%s): it will be built again next time; set "
                    "data.shard_index_dir to a writable folder", path, exc)


def current_entries(cached: Dict[str, Dict], paths: List[Path]) -> Tuple[Dict[str, ShardScan], List[Path]]:
    """The cached scans of the shards that did not change (same size and modification
    time), and the shards to scan."""
    current, stale = {}, []
    for path in paths:
        stat = path.stat()
        entry = cached.get(path.name)
        if entry is not None and (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            current[path.name] = ShardScan.from_json(entry)
        else:
            stale.append(path)
    return current, stale


def scan_shards(stale: List[Path], cached: Dict[str, Dict], index_path: Path) -> Dict[str, ShardScan]:
    changed = [path.name for path in stale if path.name in cached]
    if changed:
        log.info("re-indexing %d shard(s) that changed since they were indexed: %s", len(changed),
                 ", ".join(changed[:5]))
    started = time.perf_counter()
    log.info("indexing %d shard(s) in %s (tar headers only; cached in %s)", len(stale), stale[0].parent, index_path)
    with ThreadPoolExecutor(min(SCAN_THREADS, len(stale))) as pool:
        scans = dict(zip((path.name for path in stale), pool.map(scan_shard, stale)))
    log.info("indexed %d shard(s) in %.1f s", len(stale), time.perf_counter() - started)
    return scans


def indexed_shards(paths: List[Path], index_path: Path) -> Dict[str, ShardScan]:
    """Each shard's scan, from the cache where the shard is unchanged, scanned again where
    not; shards the cache knows but that are gone are kept, so that their samples keep
    their places and are reported as unreadable. Only a process that has shards to scan
    takes the lock (and reads the cache again: another may have scanned them meanwhile)."""
    cached = load_index(index_path)
    current, stale = current_entries(cached, paths)
    if stale:
        with locked(index_path):
            cached = load_index(index_path)
            current, stale = current_entries(cached, paths)
            if stale:
                scans = scan_shards(stale, cached, index_path)
                current.update(scans)
                cached.update((name, scan.to_json()) for name, scan in scans.items())
                save_index(index_path, cached)
    split = shard_split(paths[0].name)[:2]
    for name, entry in cached.items():
        if name not in current and (shard_split(name) or ())[:2] == split:
            log.warning("%s was indexed but is gone from %s: its %d samples will be skipped as unreadable "
                        "(restore it, or delete %s to index the shards as they are now)",
                        name, paths[0].parent, len(entry["names"]), index_path)
            current[name] = ShardScan.from_json(dict(entry, size=-1, mtime_ns=-1))
    return current


# ----------------------------------------------------------------------------- a split


@dataclass
class ShardSplit:
    """A split's samples in the class folders' order, and where each one lies."""

    paths: List[str]  # the shards
    stats: List[Tuple[int, int]]  # each shard's (size, mtime_ns) when indexed; (-1, -1): gone
    samples: List[Sample]  # ("<shard>/<member>", class): the name warnings and reports show
    shard: np.ndarray  # sample -> position in `paths`
    offset: np.ndarray
    size: np.ndarray
    problems: Dict[int, str]  # sample -> why it cannot be read (known when indexing)


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
    return ShardSplit(
        paths=paths, stats=[(scans[name].size, scans[name].mtime_ns) for name in names],
        samples=[(f"{paths[shard]}/{scans[names[shard]].names[position]}", target)
                 for target, _, shard, position in rows],
        shard=np.array([row[2] for row in rows], dtype=np.int32),
        offset=np.array([scans[names[row[2]]].offsets[row[3]] for row in rows], dtype=np.int64),
        size=np.array([scans[names[row[2]]].sizes[row[3]] for row in rows], dtype=np.int64),
        problems=problems,
    )


def read_split(folder: Path, split: str, index_dir: str = "") -> ShardSplit:
    """The split's shards in `folder`, indexed (from the cache where it is current)."""
    paths = find_shards(folder, split)
    if not paths:
        raise DatasetLayoutError(f"{folder} has no {split} shards; {SHARD_LAYOUT}")
    shards = build_split(indexed_shards(paths, index_file(folder, index_dir)), folder)
    if not shards.samples:
        raise DatasetLayoutError(f"the {split} shards in {folder} hold no samples; {SHARD_LAYOUT}")
    check_info(folder, split, shards)
    if shards.problems:
        index, reason = next(iter(sorted(shards.problems.items())))
        log.warning("%d of the %d %s samples in %s cannot be read and will be skipped and counted as unreadable, "
                    "e.g. %s: %s", len(shards.problems), len(shards.samples), split, folder,
                    shards.samples[index][0], reason)
    return shards


def read_info(folder: Path) -> Dict:
    try:
        return json.loads((folder / INFO_NAME).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", folder / INFO_NAME, exc)
        return {}


def check_info(folder: Path, split: str, shards: ShardSplit) -> None:
    """Warn where _info.json's shard sizes disagree with what the shards hold."""
    splits = read_info(folder).get("splits", {})
    info = next((splits[name] for name in split_names(split) if isinstance(splits.get(name), dict)), None)
    if not info or len(info.get("filenames", ())) != len(info.get("shard_lengths", ())):
        return
    held = np.bincount(shards.shard, minlength=len(shards.paths))
    counts = {Path(path).name: int(n) for path, n in zip(shards.paths, held)}
    differ = [f"{name} ({counts.get(name, 'missing')}, not {length})"
              for name, length in zip(info["filenames"], info["shard_lengths"]) if counts.get(name) != length]
    if differ:
        log.warning("%s: %d shard(s) hold other sample counts than %s says: %s", folder, len(differ), INFO_NAME,
                    ", ".join(differ[:3]))


def named_classes(folder: Path) -> Optional[List[str]]:
    """The class names in _info.json (ours writes them; timm's has none)."""
    names = read_info(folder).get("classes")
    return names if isinstance(names, list) and names and all(isinstance(n, str) for n in names) else None


def default_classes(num_classes: int) -> List[str]:
    """For shards that do not name their classes: ImageNet's 1000 WordNet ids in timm's
    order for a 1000-class set, else the class numbers."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    return [str(i) for i in range(num_classes)]


# ----------------------------------------------------------------------------- reading


class OpenShards:
    """This process's open shard files: a shard is opened on first use and stays open, so
    a loader worker opens each shard once, then reads each image with one pread().

    The descriptors belong to the process that opened them: a forked loader worker starts
    with none of its own. pread() has no shared file position, so nothing depends on
    which process reads. Where the open-file limit is below the number of shards even
    after raising the soft limit to the hard one, the least recently used shard is closed.
    """

    def __init__(self, paths: List[str], stats: List[Tuple[int, int]]):
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
        stat = os.fstat(fd)
        if (stat.st_size, stat.st_mtime_ns) != self.stats[shard]:
            os.close(fd)
            raise BadShardSample(f"shard {path} changed after it was indexed (size or modification time): its "
                                 f"offsets are stale; restart the run to index it again")
        if len(self.files) >= self.capacity:
            os.close(self.files.popitem(last=False)[1])
        self.files[shard] = fd
        return fd

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._descriptor(shard)
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

    def read(self, index: int) -> bytes:
        problem = self.shards.problems.get(index)
        if problem is not None:
            raise BadShardSample(problem)
        return self.files.read(int(self.shards.shard[index]), int(self.shards.offset[index]),
                               int(self.shards.size[index]))


# ----------------------------------------------------------------------------- the training and evaluation sets


def check_targets(shards: ShardSplit, classes: List[str], where: str) -> None:
    highest = max(target for _, target in shards.samples)
    if highest >= len(classes):
        raise DatasetLayoutError(f"{where} hold class index {highest}, but there are {len(classes)} classes "
                                 f"(0..{len(classes) - 1})")


def build_shard_splits(root: Path, train_transform: ImageTransform, eval_transform: ImageTransform, seed: int,
                       index_dir: str = "") -> Tuple[ShardDataset, ShardDataset]:
    """Training and validation sets from the shards in `root`, told apart by name."""
    train = read_split(root, "train", index_dir)
    val = read_split(root, "validation", index_dir)
    classes = named_classes(root) or default_classes(max(target for _, target in train.samples) + 1)
    check_targets(train, classes, f"the train shards in {root}")
    check_targets(val, classes, f"the validation shards in {root}")
    return ShardDataset(train, classes, train_transform, seed=seed), ShardDataset(val, classes, eval_transform)


def read_eval_shards(folder: Path, split: str, model_classes: List[str], index_dir: str = "") -> Tuple[ShardSplit, List[str]]:
    """An evaluation split and its class names: _info.json's, else the model's (validate.py)."""
    shards = read_split(folder, split, index_dir)
    classes = named_classes(folder) or model_classes
    check_targets(shards, classes, f"the {split} shards in {folder}")
    return shards, classes
