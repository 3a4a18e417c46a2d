"""Tar headers, read without reading an image, and WebDataset tar shards read by random access.

    DIR/imagenet1k-train-0000.tar ... -1023.tar     timm's imagenet-1k-wds layout: each sample
    DIR/imagenet1k-validation-00.tar ... -63.tar    is <key>.jpg + <key>.cls (the class index),
    DIR/_info.json                                  with the split sizes (optional here)

The index, from the tar headers and the small .cls members, puts sample i where the class folders
put it, however data/pack_shards.py shuffled the shards: training gives the folders' weights. A
sample without an image or a class, or lost after a cut, keeps its place, counted as unreadable.
Not webdataset's `wids`: it copies every shard to a local cache, keeps 10 open by default (of
1,024, read at random), re-indexes a shard at each open, numbers samples in shard order and asserts
where we need a message and a counted sample; random access needs only the headers and os.pread.
"""
import itertools
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from common.errors import DatasetLayoutError

from ..config import DataConfig
from ..sample_index import Identity, Member, SampleIndex, absolute, cache_file, cached, files_key, identity
from .labels import IMAGE_EXTENSIONS, default_classes

log = logging.getLogger(__name__)

# <prefix>-<split>-<number>.tar, as timm names them: imagenet1k-train-0000.tar
SHARD_NAME = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<split>[^-]+)-(?P<number>\d+)\.tar$")
EVAL_SPLITS = ("validation", "val")  # timm says validation; either is taken for --split val
INFO_NAME = "_info.json"  # timm's: split sizes, shard file names; ours adds the class names
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # jpg, jpeg, png, ...
SCAN_THREADS = 16  # shards indexed at once: the scan waits on the filesystem, not the CPU
INDEX_RULE = "shards 2"  # changes when what an index holds changes: older caches are rebuilt
SHARD_LAYOUT = """expected WebDataset tar shards as timm publishes ImageNet:
    DIR/<name>-train-NNNN.tar          each sample a <key>.jpg and a <key>.cls (class index)
    DIR/<name>-validation-NN.tar       (or -val-); python -m data.pack_shards makes them
    DIR/_info.json                     optional: split sizes, class names"""
TarMember = Tuple[str, int, int, Optional[bytes]]  # name, data offset, size, the bytes of a .cls member


def tar_members(handle: BinaryIO, size: int) -> Tuple[List[TarMember], str]:
    """Every file member of an open tar of `size` bytes (or a window on one inside another: archives.py), the
    .cls members' bytes, and what is wrong with its end as tarfile states it ("" if nothing)."""
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except tarfile.ReadError as exc:
        return [], f"not a tar archive ({exc})"
    members, damage = [], ""
    try:
        for info in tar:
            if info.isfile():
                wanted = member_key(info.name)[1] == "cls" and info.offset_data + info.size <= size
                members.append((info.name, info.offset_data, info.size,
                                tar.extractfile(info).read() if wanted else None))
    except tarfile.ReadError as exc:  # "unexpected end of data": the last member's bytes are cut
        damage = str(exc)
    handle.seek(tar.offset)
    if not damage and handle.read(512) != bytes(512):  # tar ends with zero blocks; a cut header does not
        damage = f"no end-of-archive marker at byte {tar.offset}"
    return members, damage


def member_key(name: str) -> Tuple[str, str]:
    """WebDataset's rule: "a/b.seg.png" -> "a/b", "seg.png" (the first dot of the last part)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def shard_name(name: str) -> Optional[Tuple[str, str, int]]:
    match = SHARD_NAME.match(name)
    return (match.group("prefix") or "", match.group("split").lower(), int(match.group("number"))) if match else None


def split_names(split: str) -> Tuple[str, ...]:
    return EVAL_SPLITS if split.lower() in EVAL_SPLITS else (split.lower(),)


def find_shards(folder: Path, split: str) -> List[Path]:
    """The split's shards in `folder`, in number order; [] if it has none."""
    if not folder.is_dir():
        return []
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            parts = shard_name(entry.name)
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


def holds(folder: Path, split: str = "train") -> bool:
    return bool(find_shards(folder, split))


@dataclass
class Scan:
    """A shard's samples in member order, as (name, offset, size, class, why it cannot be read)."""

    identity: Identity
    rows: List[Tuple[str, int, int, int, str]]
    damage: str = ""  # what is wrong with its end; "": whole
    lost: Optional[int] = 0  # samples after a cut, kept from the earlier index or _info.json; None: unknown


def scan_shard(path: Path) -> Scan:
    """A shard's samples (consecutive members with one key), each with its image member, class, or why not."""
    try:
        stat = path.stat()
        with open(path, "rb") as handle:
            members, damage = tar_members(handle, stat.st_size)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read shard {path}: {exc}") from None
    if damage:
        last = members[-1][0] if members else "its first member"
        damage = f"{path.name} is cut short or damaged at byte {stat.st_size} ({damage}): members after {last} are lost"
    named = [(member_key(m[0])[0], m) for m in members if member_key(m[0])[1]]  # as webdataset, no extension: skipped
    groups = [(key, [m for _, m in group]) for key, group in itertools.groupby(named, key=itemgetter(0))]
    rows = [sample_row(key, group, stat.st_size, damage if at == len(groups) - 1 else "")
            for at, (key, group) in enumerate(groups)]
    return Scan(identity(stat), rows, damage, None if damage else 0)


def sample_row(key: str, group: List[TarMember], shard_size: int, damage: str) -> Tuple[str, int, int, int, str]:
    """One sample's row; one without an image lies where its first member does (member order)."""
    image = next((m for m in group if member_key(m[0])[1] in IMAGE_MEMBERS), None)
    label = next((m for m in group if member_key(m[0])[1] == "cls"), None)
    target, problem, cut = -1, "", f"; {damage}" if damage else ""
    if label is None or label[3] is None:
        problem = f"no .cls member (its class){cut}"
    else:
        try:
            target = int(label[3].decode().strip())
            if target < 0:
                raise ValueError
        except ValueError:
            problem = f"its .cls member holds {label[3][:20]!r}, not a class index"
    if image is None:
        others = ", ".join("." + member_key(m[0])[1] for m in group)
        problem = problem or f"no image member (it has {others}; expected .jpg or another image type){cut}"
        return key, group[0][1], 0, target, problem
    if image[1] + image[2] > shard_size:
        problem = problem or f"cut short: the shard ends {shard_size - image[1]} bytes into this member's {image[2]}{cut}"
    return image[0], image[1], image[2], target, problem


def keep_lost(scan: Scan, name: str, earlier: Optional[Scan]) -> Scan:
    """A shard cut short since it was indexed keeps its earlier samples in their places (an exact resume stays
    exact), those after the cut unreadable; cached with the cut shard's identity until it is repaired."""
    if not scan.damage or earlier is None or earlier.identity[0] <= scan.identity[0]:
        return scan
    kept, rows = len(scan.rows), earlier.rows
    same = all(a[:2] == b[:2] for a, b in zip(scan.rows[:-1], rows)) and kept <= len(rows) and \
        (kept == 0 or member_key(scan.rows[-1][0])[0] == member_key(rows[kept - 1][0])[0])
    if not same:
        return scan
    lost = f"lost: {name} is cut short at byte {scan.identity[0]} (it was {earlier.identity[0]} bytes when indexed)"
    return Scan(scan.identity, scan.rows + [row[:4] + (lost,) for row in rows[kept:]], scan.damage, len(rows) - kept)


def count_lost(name: str, scan: Scan, lengths: Dict[str, int]) -> str:
    """A cut shard's warning, with what it lost: the earlier index's samples after the cut, else _info.json's
    count (added as placeholders, class unknown: placed last), else unknown, and it says so."""
    if scan.lost is None and name in lengths:
        missing, found = max(0, lengths[name] - len(scan.rows)), len(scan.rows)
        reason = (f"lost: {name} is cut short at byte {scan.identity[0]}; {INFO_NAME} says it holds {lengths[name]} "
                  f"samples, its tar headers show {found}")
        scan.rows += [(f"<lost sample {k:0{len(str(missing))}d} of {missing}>", scan.identity[0], 0, -1, reason)
                      for k in range(1, missing + 1)]
        scan.lost = missing
    if scan.lost is None:
        return (f"{scan.damage}. The number of samples lost after the cut is unknown: the shard was not indexed whole "
                f"before, and {INFO_NAME} gives no sample count for it, so only its cut sample is counted as "
                f"unreadable; copy the shard again from its source")
    return f"{scan.damage}; {scan.lost} sample(s) after the cut will be skipped and counted as unreadable; copy the " \
           f"shard again from its source"


def earlier_scans(previous: Optional[SampleIndex]) -> Dict[str, Tuple[Scan, str]]:
    """Each shard's scan, in member order, and warning, as the earlier index holds them."""
    if previous is None:
        return {}
    offsets, sizes = previous.arrays["offset"], previous.arrays["size"]
    warnings = dict(previous.warnings)
    scans = {c: Scan(tuple(identity), []) for c, identity in enumerate(previous.identities)}
    for i in np.lexsort((offsets, previous.folder_of)).tolist():
        scans[int(previous.folder_of[i])].rows.append((previous.name(i), int(offsets[i]), int(sizes[i]),
                                                        int(previous.targets[i]), previous.problems.get(i, "")))
    return {Path(previous.folders[c]).name: (scan, warnings.get(c, "")) for c, scan in scans.items()}


def scanned(paths: List[Path], earlier: Dict[str, Tuple[Scan, str]], lengths: Dict[str, int],
            index: Path) -> Dict[str, Tuple[Scan, str]]:
    """Each shard's scan and warning: the earlier one where the shard is unchanged, else a new scan. A shard
    that is gone keeps its samples in their places, unreadable, so every other sample keeps its index."""
    current = {path.name: identity(path.stat()) for path in paths}
    found = {name: earlier[name] for name in current if name in earlier and earlier[name][0].identity == current[name]}
    stale = [path for path in paths if path.name not in found]
    if stale:
        changed = [path.name for path in stale if path.name in earlier]
        if changed:
            log.info("re-indexing %d shard(s) that changed since they were indexed: %s", len(changed),
                     ", ".join(changed[:5]))
        pool = ThreadPoolExecutor(min(SCAN_THREADS, len(stale)))
        try:
            for path, scan in zip(stale, pool.map(scan_shard, stale)):
                scan = keep_lost(scan, path.name, earlier[path.name][0] if path.name in earlier else None)
                found[path.name] = scan, count_lost(path.name, scan, lengths) if scan.damage else ""
        finally:  # a stop signal during the scan ends it after the shards being read, not after all
            pool.shutdown(cancel_futures=True)
    for name in sorted(set(earlier) - set(current)):
        rows = earlier[name][0].rows
        why = f"shard {name} is gone: deleted or moved after it was indexed"
        found[name] = Scan((-1, -1, -1), [row[:4] + (why,) for row in rows]), \
            f"{name} was indexed but is gone from {paths[0].parent}: its {len(rows)} samples will be skipped as " \
            f"unreadable (restore it, or delete {index} to index the shards as they are now)"
    return found


def shard_index(folder: Path, split: str, index_dir: str = "") -> SampleIndex:
    folder = absolute(folder)
    paths = find_shards(folder, split)
    if not paths:
        raise DatasetLayoutError(f"{folder} has no {split} shards; {SHARD_LAYOUT}")
    key = [INDEX_RULE, *files_key(*paths, folder / INFO_NAME)]

    def build(previous):
        scans = scanned(paths, earlier_scans(previous), info_lengths(folder, split),
                        cache_file(folder, f"shards-{split}.idx", index_dir))
        names = sorted(scans, key=lambda name: shard_name(name)[2])
        members = [Member(row[3], row[0], c, row[1], row[2], row[4]) for c, name in enumerate(names)
                   for row in scans[name][0].rows]
        # Samples with a class in the folders' order; those without one (no readable .cls) at the end.
        order = sorted(range(len(members)), key=lambda i: (members[i].target < 0, members[i].target,
                                                          member_key(members[i].name)[0] + ".", members[i].container, i))
        index = SampleIndex.from_members([str(folder / name) for name in names], [scans[n][0].identity for n in names],
                                         [members[i] for i in order],
                                         warnings=[(c, scans[n][1]) for c, n in enumerate(names) if scans[n][1]])
        return index, key

    index = cached(f"the {split} shards in {folder}", folder, f"shards-{split}.idx", key, build, index_dir)
    if not len(index):
        raise DatasetLayoutError(f"the {split} shards in {folder} hold no samples; {SHARD_LAYOUT}")
    held = np.bincount(index.folder_of, minlength=len(index.folders))
    counts = {Path(path).name: int(n) for path, n in zip(index.folders, held)}
    differ = [f"{name} ({counts.get(name, 'missing')}, not {length})"
              for name, length in info_lengths(folder, split).items() if counts.get(name) != length]
    if differ:
        log.warning("%s: %d shard(s) hold other sample counts than %s says: %s", folder, len(differ), INFO_NAME,
                    ", ".join(differ[:3]))
    return index


def read_info(folder: Path) -> Dict:
    try:
        return json.loads((folder / INFO_NAME).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", folder / INFO_NAME, exc)
        return {}


def info_lengths(folder: Path, split: str) -> Dict[str, int]:
    """_info.json's sample count of each of the split's shards, by file name."""
    splits = read_info(folder).get("splits")
    splits = splits if isinstance(splits, dict) else {}
    info = next((splits[name] for name in split_names(split) if isinstance(splits.get(name), dict)), {})
    names, lengths = info.get("filenames", ()), info.get("shard_lengths", ())
    if not isinstance(names, list) or not isinstance(lengths, list) or len(names) != len(lengths):
        return {}
    return {name: length for name, length in zip(names, lengths) if isinstance(length, int)}


def named_classes(folder: Path) -> Optional[List[str]]:
    """The class names in _info.json (ours writes them; timm's has none)."""
    names = read_info(folder).get("classes")
    return names if isinstance(names, list) and names and all(isinstance(n, str) for n in names) else None


def with_classes(index: SampleIndex, classes: List[str], where: str) -> SampleIndex:
    highest = int(index.targets.max())
    if highest >= len(classes):
        raise DatasetLayoutError(f"{where} hold class index {highest}, but there are {len(classes)} classes "
                                 f"(0..{len(classes) - 1})")
    return index


def splits(root: Path, config: DataConfig, seed: int) -> Tuple[SampleIndex, SampleIndex, List[str]]:
    train, val = shard_index(root, "train", config.index_dir), shard_index(root, "validation", config.index_dir)
    classes = named_classes(root) or default_classes(int(train.targets.max()) + 1)
    return (with_classes(train, classes, f"the train shards in {root}"),
            with_classes(val, classes, f"the validation shards in {root}"), classes)


def evaluation(folder: Path, split: str, model_classes: List[str], index_dir: str) -> Tuple[SampleIndex, List[str], str]:
    index, classes = shard_index(folder, split, index_dir), named_classes(folder) or model_classes
    return with_classes(index, classes, f"the {split} shards in {folder}"), classes, "shards"
