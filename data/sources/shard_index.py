"""The index of WebDataset tar shards: where each sample's image lies, and its class.

The index, (shard, offset, size, class, name) per sample, is built once by reading the
tar headers and the small .cls members (no image is read or decoded), cached in a JSON
file beside the shards (or under ~/.cache/cspresnet when that folder is read-only, or in
data.index_dir), and rebuilt for a shard whose size or modification time changed.
A shard's samples are its consecutive members with one key (WebDataset's rule); a sample
without an image or a readable class is kept, with the reason, so that it is counted as
unreadable where it would have been read. A shard cut short keeps the samples its earlier
index saw after the cut, each with the reason, in their places: they are counted as lost,
not silently dropped, and every other sample keeps its index.
"""
import hashlib
import json
import logging
import os
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple

from ..errors import DatasetLayoutError
from .class_folders import IMAGE_EXTENSIONS
from ..sample_index import absolute, identity, locked

log = logging.getLogger(__name__)

# <prefix>-<split>-<number>.tar, as timm names them: imagenet1k-train-0000.tar
SHARD_NAME = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<split>[^-]+)-(?P<number>\d+)\.tar$")
EVAL_SPLITS = ("validation", "val")  # timm says validation; either is taken for --split val
INDEX_NAME = "_cspresnet_index.json"  # beside the shards
INDEX_FORMAT = 1
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # jpg, jpeg, png, ...
SCAN_THREADS = 16  # shards indexed at once: the scan waits on the filesystem, not the CPU

# ----------------------------------------------------------------------------- names


def shard_split(name: str) -> Optional[Tuple[str, str, int]]:
    """(prefix, split, number) of a shard's file name, or None for any other file."""
    match = SHARD_NAME.match(name)
    if not match:
        return None
    return match.group("prefix") or "", match.group("split").lower(), int(match.group("number"))


def split_names(split: str) -> Tuple[str, ...]:
    return EVAL_SPLITS if split.lower() in EVAL_SPLITS else (split.lower(),)


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
    ctime_ns: int
    names: List[str] = field(default_factory=list)  # the image member's name (the key, if it has none)
    offsets: List[int] = field(default_factory=list)  # where the image's bytes start
    sizes: List[int] = field(default_factory=list)
    classes: List[int] = field(default_factory=list)  # -1: unknown
    problems: List[Tuple[int, str]] = field(default_factory=list)
    damage: str = ""  # what is wrong with the archive's end; "": whole
    lost: Optional[int] = 0  # samples after a cut, kept from the earlier index (or _info.json's); None: unknown

    def to_json(self) -> Dict:
        return dict(self.__dict__, problems=[list(p) for p in self.problems])

    @classmethod
    def from_json(cls, entry: Dict) -> "ShardScan":
        return cls(**{"ctime_ns": -1, **entry, "problems": [tuple(p) for p in entry["problems"]]})


Member = Tuple[str, int, int, Optional[bytes]]  # name, data offset, size, the bytes of a .cls member


def read_members(path: Path, size: int) -> Tuple[List[Member], str]:
    """Every file member's name, offset and size from the tar headers, the .cls members'
    bytes, and what is wrong with the archive's end ("" if nothing)."""
    with open(path, "rb") as handle:
        members, damage = tar_members(handle, size)
    if damage:
        last = members[-1][0] if members else "its first member"
        damage = f"{path.name} is cut short or damaged at byte {size} ({damage}): members after {last} are lost"
    return members, damage


def tar_members(handle: BinaryIO, size: int) -> Tuple[List[Member], str]:
    """read_members of an open tar of `size` bytes (a file, or a window on a tar inside
    another: data/sources/archives.py); the damage as tarfile states it."""
    members: List[Member] = []
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
    return members, damage


def scan_shard(path: Path) -> ShardScan:
    """Index one shard: its samples (consecutive members with one key) with their image
    member and class; a sample without either is kept, with the reason, to be counted."""
    try:
        stat = path.stat()
        members, damage = read_members(path, stat.st_size)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read shard {path}: {exc}") from None
    scan = ShardScan(*identity(stat), damage=damage, lost=None if damage else 0)
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
        problem = problem or (f"no image member (it has {others}; expected .jpg or another image type)"
                              + (f"; {damage}" if damage else ""))
    elif image[1] + image[2] > shard_size:
        problem = problem or (f"cut short: the shard ends {shard_size - image[1]} bytes into this member's "
                              f"{image[2]}; {damage}")
    scan.names.append(image[0] if image else key)
    scan.offsets.append(image[1] if image else 0)
    scan.sizes.append(image[2] if image else 0)
    scan.classes.append(target)
    if problem:
        scan.problems.append((len(scan.names) - 1, problem))


def is_prefix(scan: ShardScan, earlier: ShardScan) -> bool:
    """Whether the samples of a cut shard are the first ones of its earlier index: the same
    image names at the same offsets, the last (the cut one) at least with the same key."""
    count = len(scan.names)
    if count > len(earlier.names):
        return False
    same = all(scan.names[i] == earlier.names[i] and scan.offsets[i] == earlier.offsets[i] for i in range(count - 1))
    return same and (count == 0 or member_key(scan.names[-1])[0] == member_key(earlier.names[count - 1])[0])


def keep_lost(scan: ShardScan, name: str, entry: Optional[Dict]) -> ShardScan:
    """A shard cut short since it was indexed: its earlier samples in their places (so every
    sample keeps its index and an exact resume stays exact), those after the cut unreadable.
    The result is cached with the cut shard's size and time: the next run reads it as it is,
    a further cut is checked against it, and a repaired shard (a new size) is scanned whole."""
    earlier = ShardScan.from_json(entry) if entry else None
    if not scan.damage or earlier is None or earlier.size <= scan.size or not is_prefix(scan, earlier):
        return scan
    kept = len(scan.names)
    lost = f"lost: {name} is cut short at byte {scan.size} (it was {earlier.size} bytes when indexed)"
    return ShardScan(scan.size, scan.mtime_ns, scan.ctime_ns, earlier.names, earlier.offsets, earlier.sizes, earlier.classes,
                     scan.problems + [(i, lost) for i in range(kept, len(earlier.names))], scan.damage,
                     len(earlier.names) - kept)


# ----------------------------------------------------------------------------- the cached index


def index_file(folder: Path, index_dir: str = "") -> Path:
    """Where the scans are written: beside the shards if that folder is writable, else in a
    per-user cache; `index_dir` (data.index_dir) decides instead when it is set."""
    folder = absolute(folder)
    tag = f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}.json"
    if index_dir:
        return Path(index_dir).expanduser() / tag
    if os.access(folder, os.W_OK):
        return folder / INDEX_NAME
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cspresnet" / "shard-index" / tag


def load_index(path: Path, folder: Path) -> Dict[str, Dict]:
    """The cached entries by shard file name, from `path`, else from the scans a read-only
    `folder` holds beside its shards (built before it was made read-only); {} when there are none."""
    read_only = not os.access(absolute(folder), os.W_OK)
    for place in dict.fromkeys([path] + ([absolute(folder) / INDEX_NAME] if read_only else [])):
        try:
            index = json.loads(place.read_text())
            if index.get("format") == INDEX_FORMAT:
                return index["shards"]
            log.warning("the shard index %s is of another format: indexing again", place)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError, KeyError) as exc:
            log.warning("the shard index %s cannot be read (%s): indexing again", place, exc)
    return {}


def save_index(path: Path, shards: Dict[str, Dict]) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps({"format": INDEX_FORMAT, "shards": shards}, separators=(",", ":")))
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.warning("could not save the shard index to %s (%s): it will be built again next time; set "
                    "data.index_dir to a writable folder", path, exc)


def current_entries(cached: Dict[str, Dict], paths: List[Path]) -> Tuple[Dict[str, ShardScan], List[Path]]:
    """The cached scans of the shards that did not change (the same identity: size,
    modification and change time), and the shards to scan. An entry without "damage" was written by an older
    version, which kept no record of a cut: that shard is scanned again."""
    current, stale = {}, []
    for path in paths:
        stat = path.stat()
        entry = cached.get(path.name)
        if entry is not None and "damage" in entry and \
                (entry["size"], entry["mtime_ns"], entry.get("ctime_ns")) == identity(stat):
            current[path.name] = ShardScan.from_json(entry)
        else:
            stale.append(path)
    return current, stale


def scan_shards(stale: List[Path], cached: Dict[str, Dict], index_path: Path) -> Dict[str, ShardScan]:
    """Scan the stale shards; a shard cut short since it was indexed keeps its lost samples."""
    changed = [path.name for path in stale if "damage" in cached.get(path.name, {})]
    if changed:
        log.info("re-indexing %d shard(s) that changed since they were indexed: %s", len(changed),
                 ", ".join(changed[:5]))
    older = sum(1 for path in stale if path.name in cached and "damage" not in cached[path.name])
    if older:
        log.info("re-indexing %d shard(s) indexed by an older version, which did not record cut shards", older)
    started = time.perf_counter()
    log.info("indexing %d shard(s) in %s (tar headers only; cached in %s)", len(stale), stale[0].parent, index_path)
    pool = ThreadPoolExecutor(min(SCAN_THREADS, len(stale)))
    try:
        scans = {path.name: keep_lost(scan, path.name, cached.get(path.name))
                 for path, scan in zip(stale, pool.map(scan_shard, stale))}
    finally:  # a stop signal during the scan ends it after the shards being read, not after all
        pool.shutdown(cancel_futures=True)
    log.info("indexed %d shard(s) in %.1f s", len(stale), time.perf_counter() - started)
    return scans


def indexed_shards(paths: List[Path], index_path: Path) -> Dict[str, ShardScan]:
    """Each shard's scan, from the cache where the shard is unchanged, scanned again where
    not; shards the cache knows but that are gone are kept, so that their samples keep
    their places and are reported as unreadable. Only a process that has shards to scan
    takes the lock (and reads the cache again: another may have scanned them meanwhile)."""
    cached = load_index(index_path, paths[0].parent)
    current, stale = current_entries(cached, paths)
    if stale:
        with locked(index_path):
            cached = load_index(index_path, paths[0].parent)
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
            current[name] = ShardScan.from_json(dict(entry, size=-1, mtime_ns=-1, ctime_ns=-1))
    return current
