"""A split read out of one archive file (ImageNet's official tars, Kaggle's zip): each
sample's class, name and the place of its bytes, in the class folders' order, cached.

An archive is read as one tar shard (data/sources/shards.py): its samples all lie in the one file,
each at its offset, so the shard reader (one open per process, one pread per image), its
dataset and its checks of a changed or vanished file serve it unchanged. Sample i is the
class folders' sample i (classes in order, then file names sorted), named
'<wnid>/<file name>' as in a folder, so that the training set's fingerprint is the folders'
too. The index is built once, under data/sample_index.py's lock, and cached as a
SampleIndex beside the archives (or in data.index_dir, or the per-user cache when their
folder is read-only); it is built again when any file it was read from changed size or
modification time.
"""
import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..sample_index import SampleIndex, cached, identity
from .shards import ShardSplit

log = logging.getLogger(__name__)

INDEX_RULE = "archive index 2"  # changes when what an index holds changes: older caches are rebuilt
# (class, '<wnid>/<file name>', offset, size, why it cannot be read or "", then any source-specific values)
Row = Tuple


def file_key(paths: Sequence[Path]) -> List:
    """What a cached index must match: each file's name, size and time (-1 where absent)."""
    key: List = [INDEX_RULE]
    for path in paths:
        try:
            found = path.stat()
            key.append([str(path), *identity(found)])
        except FileNotFoundError:
            key.append([str(path), -1, -1, -1])
    return key


def split_from_rows(archive: Path, stat: Tuple[int, int, int], rows: List[Row], extra: Sequence[str] = (),
                    classes: Optional[List[str]] = None) -> ShardSplit:
    """The rows in the class folders' order, as a shard split of the one file `archive`
    (`stat`: its identity when it was scanned); `extra` names the rows' further
    values, kept as arrays of the index."""
    rows.sort(key=lambda row: (row[0], row[1]))
    arrays = {name: np.array([row[5 + k] for row in rows], dtype=np.int64) for k, name in enumerate(extra)}
    samples = SampleIndex.from_rows(
        [str(archive)], np.zeros(len(rows), dtype=np.int32), [row[1] for row in rows], [row[0] for row in rows],
        offset=np.array([row[2] for row in rows], dtype=np.int64), size=np.array([row[3] for row in rows],
                                                                                  dtype=np.int64), **arrays)
    return ShardSplit([str(archive)], [stat], samples, {i: row[4] for i, row in enumerate(rows) if row[4]}, classes)


def read_cached(name: str, sources: Sequence[Path], build: Callable[[], ShardSplit], index_dir: str = "") -> ShardSplit:
    """The split from its cache `name` if it was built from `sources` as they are now, else
    built by one process (the others wait on the lock, then read its cache) and cached."""
    key = file_key(sources)  # before any scan: a file changed during it shows at the next start

    def built():
        split = build()
        return split.samples, dict(stats=split.stats, problems=split.problems, classes=split.classes), key

    samples, extra = cached(sources[0].name, sources[0].parent, name, key, built, index_dir)
    return ShardSplit(samples.folders, [tuple(stat) for stat in extra["stats"]], samples,
                      {int(index): reason for index, reason in extra["problems"].items()}, extra.get("classes"))


def warn_problems(split: ShardSplit, what: str) -> None:
    """One line a run for the samples that cannot be read: they are skipped and counted."""
    if split.problems:
        index, reason = min(split.problems.items())
        log.warning("%d of the %d samples of %s cannot be read and will be skipped and counted as unreadable, "
                    "e.g. %s: %s", len(split.problems), len(split.samples), what, split.samples[index][0], reason)
