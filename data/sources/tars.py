"""Tar headers, read without reading an image, and WebDataset tar shards in timm's layout (EXPECTS) read by
random access. Sample i is where the class folders put it, however the shards were shuffled, so training gives the
folders' weights; a sample that cannot be read keeps its place, counted as unreadable (docs/shards.md)."""
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
from common.progress import progress

from ..config import DataConfig
from ..sample_index import Identity, Member, SampleIndex, absolute, cache_file, cached, files_key, identity
from .labels import SUFFIXES, default_classes

log = logging.getLogger(__name__)

# <prefix>-<split>-<number>.tar, as timm names them: imagenet1k-train-0000.tar
SHARD_NAME = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<split>[^-]+)-(?P<number>\d+)\.tar$")
EVAL_SPLITS = ("validation", "val")  # timm says validation; either is taken for --split val
INFO_NAME = "_info.json"  # timm's: split sizes, shard file names; ours adds the class names
SCAN_THREADS = 16  # shards indexed at once: the scan waits on the filesystem, not the CPU
INDEX_RULE = "shards 2"  # changes when what an index holds changes: older caches are rebuilt
EXPECTS = ("DIR/<name>-train-NNNN.tar and DIR/<name>-validation-NN.tar (or -val-), each sample a <key>.jpg and a "
           "<key>.cls (its class), and optionally _info.json (split sizes, class names): WebDataset tar shards as "
           "timm publishes ImageNet, or as python -m data.pack_shards makes them (docs/shards.md)")
TarMember = Tuple[str, int, int, Optional[bytes]]  # name, data offset, size, the bytes of a .cls member


def tar_members(handle: BinaryIO, size: int, what: str = "") -> Tuple[List[TarMember], str]:
    """Every file member of an open tar of `size` bytes (or a window on one inside another: archives.py), the
    .cls members' bytes, and what is wrong with its end as tarfile states it ("" if nothing); the progress of
    `what`, if named (an archive of 50,000 members)."""
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except tarfile.ReadError as exc:
        return [], f"not a tar archive ({exc})"
    members, damage = [], ""
    try:
        for info in progress(tar, what, unit="members") if what else tar:
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
    """A shard's samples in member order (their container is set once the shards are numbered)."""

    identity: Identity
    rows: List[Member]
    damage: str = ""  # what is wrong with its end; "": whole
    warning: str = ""  # said at every start while the shard is as it is


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
    return Scan(identity(stat), rows, damage)


def sample_row(key: str, group: List[TarMember], shard_size: int, damage: str) -> Member:
    """One sample; one without an image lies where its first member does (member order)."""
    image = next((m for m in group if member_key(m[0])[1] in SUFFIXES), None)
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
        return Member(target, key, 0, group[0][1], 0, problem)
    if image[1] + image[2] > shard_size:
        problem = problem or (f"cut short: the shard ends {shard_size - image[1]} bytes into this member's "
                              f"{image[2]}{cut}")
    return Member(target, image[0], 0, image[1], image[2], problem)


def with_lost(scan: Scan, name: str, earlier: Optional[Scan], lengths: Dict[str, int]) -> Scan:
    """A cut shard keeps what it lost as unreadable samples: the earlier index's after the cut, in their places (an
    exact resume stays exact; cached with the cut shard's identity until it is repaired), else as many as _info.json
    counts (placeholders, class unknown: placed last); else their number is unknown, and its warning says so."""
    if not scan.damage:
        return scan
    kept, rows = len(scan.rows), earlier.rows if earlier is not None else []
    same = earlier is not None and earlier.identity[0] > scan.identity[0] and kept <= len(rows) and \
        all((a.name, a.offset) == (b.name, b.offset) for a, b in zip(scan.rows[:-1], rows)) and \
        (kept == 0 or member_key(scan.rows[-1].name)[0] == member_key(rows[kept - 1].name)[0])
    if same:  # cut since it was indexed whole
        lost = f"lost: {name} is cut short at byte {scan.identity[0]} (it was {earlier.identity[0]} bytes when indexed)"
        scan.rows += [row._replace(problem=lost) for row in rows[kept:]]
    elif name in lengths:
        missing = max(0, lengths[name] - kept)
        reason = (f"lost: {name} is cut short at byte {scan.identity[0]}; {INFO_NAME} says it holds {lengths[name]} "
                  f"samples, its tar headers show {kept}")
        scan.rows += [Member(-1, f"<lost sample {k:0{len(str(missing))}d} of {missing}>", 0, scan.identity[0], 0,
                             reason) for k in range(1, missing + 1)]
    else:
        scan.warning = (f"{scan.damage}. The number of samples lost after the cut is unknown: the shard was not "
                        f"indexed whole before, and {INFO_NAME} gives no sample count for it, so only its cut sample "
                        f"is counted as unreadable; copy the shard again from its source")
        return scan
    scan.warning = (f"{scan.damage}; {len(scan.rows) - kept} sample(s) after the cut will be skipped and counted as "
                    f"unreadable; copy the shard again from its source")
    return scan


def earlier_scans(previous: Optional[SampleIndex]) -> Dict[str, Scan]:
    """Each shard's scan, in member order, as the earlier index holds it."""
    if previous is None:
        return {}
    offsets, sizes, targets = previous.arrays["offset"], previous.arrays["size"], previous.targets
    warnings = dict(previous.warnings)
    scans = {c: Scan(tuple(each), [], warning=warnings.get(c, "")) for c, each in enumerate(previous.identities)}
    for i in np.lexsort((offsets, previous.folder_of)).tolist():
        scans[int(previous.folder_of[i])].rows.append(Member(int(targets[i]), previous.name(i), 0, int(offsets[i]),
                                                             int(sizes[i]), previous.problems.get(i, "")))
    return {Path(previous.folders[c]).name: scan for c, scan in scans.items()}


def scanned(paths: List[Path], earlier: Dict[str, Scan], lengths: Dict[str, int], index: Path) -> Dict[str, Scan]:
    """Each shard's scan: the earlier one where the shard is unchanged, else a new scan. A shard that is gone
    keeps its samples in their places, unreadable, so every other sample keeps its index."""
    current = {path.name: identity(path.stat()) for path in paths}
    found = {name: earlier[name] for name in current if name in earlier and earlier[name].identity == current[name]}
    stale = [path for path in paths if path.name not in found]
    changed = [path.name for path in stale if path.name in earlier]
    if changed:
        log.info("re-indexing %d shard(s) that changed since they were indexed: %s", len(changed),
                 ", ".join(changed[:5]))
    pool = ThreadPoolExecutor(max(1, min(SCAN_THREADS, len(stale))))  # starts no thread until a shard is stale
    try:
        scans = progress(pool.map(scan_shard, stale), f"indexing the shards in {paths[0].parent}", len(stale), "shards")
        for path, scan in zip(stale, scans):
            found[path.name] = with_lost(scan, path.name, earlier.get(path.name), lengths)
    finally:  # a stop signal during the scan ends it after the shards being read, not after all
        pool.shutdown(cancel_futures=True)
    for name in sorted(set(earlier) - set(current)):
        rows = earlier[name].rows
        why = f"shard {name} is gone: deleted or moved after it was indexed"
        found[name] = Scan((-1, -1, -1), [row._replace(problem=why) for row in rows], warning=(
            f"{name} was indexed but is gone from {paths[0].parent}: its {len(rows)} samples will be skipped as "
            f"unreadable (restore it, or delete {index} to index the shards as they are now)"))
    return found


def shard_index(folder: Path, split: str, index_dir: str = "") -> SampleIndex:
    folder = absolute(folder)
    paths = find_shards(folder, split)
    if not paths:
        raise DatasetLayoutError(f"{folder} has no {split} shards; expected tar shards: {EXPECTS}")
    key = [INDEX_RULE, *files_key(*paths, folder / INFO_NAME)]

    def build(previous):
        scans = scanned(paths, earlier_scans(previous), info_lengths(folder, split),
                        cache_file(folder, f"shards-{split}.idx", index_dir))
        names = sorted(scans, key=lambda name: shard_name(name)[2])
        members = [row._replace(container=c) for c, name in enumerate(names) for row in scans[name].rows]
        # Samples with a class in the folders' order; those without one (no readable .cls) at the end.
        members.sort(key=lambda m: (m.target < 0, m.target, member_key(m.name)[0] + ".", m.container))
        warnings = [(c, scans[name].warning) for c, name in enumerate(names) if scans[name].warning]
        return SampleIndex.from_members([str(folder / name) for name in names], [scans[n].identity for n in names],
                                        members, warnings=warnings), key

    index = cached(f"the {split} shards in {folder}", folder, f"shards-{split}.idx", key, build, index_dir)
    if not len(index):
        raise DatasetLayoutError(f"the {split} shards in {folder} hold no samples; expected tar shards: {EXPECTS}")
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


def evaluation(folder: Path, split: str, model_classes: List[str],
               index_dir: str) -> Tuple[SampleIndex, List[str], str]:
    index, classes = shard_index(folder, split, index_dir), named_classes(folder) or model_classes
    return with_classes(index, classes, f"the {split} shards in {folder}"), classes, "shards"
