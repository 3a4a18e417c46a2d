"""A split's samples as a few flat arrays, memory-mapped from a cache file: the one index that
every source of ImageNet builds, and the one routine that caches it.

A Python list of 1.28M (path, class) tuples costs 223 MB in every process, and a loader
worker that reads it touches the reference counts of its objects, so copy-on-write
duplicates their pages in every worker (pytorch/pytorch#13246): 8 ranks x 8 workers, about
12 GB for file names. A SampleIndex holds each sample's folder, class and name in numpy
arrays and one byte buffer instead: no Python object per sample, pages that reading never
writes, and, mapped from its cache file, pages that every rank and worker of a node share.
index[i] still gives the (path, class) pair that the rest of the code reads.

A sample is one of two kinds, which says how the dataset reads it (data/dataset.py):
`files`, the file folders[folder_of[i]]/<name>; or `members`, bytes inside the container
file folders[folder_of[i]] (an archive, a zip, a tar shard) at `offset`, `size` long, stored
or deflated (`method`, zipfile's numbers) into `length` bytes. An index also keeps what its
source knew when it built it: why a sample cannot be read (`problems`), each container's
identity, the class names where the data names them, and what is wrong with each container,
to be said at every start.

The cache file: MAGIC, the header's length (8 bytes, little-endian), the header (JSON: what
the index was built from, to tell when it is stale, and the fields above), then the arrays,
each at a 64-byte boundary. It is written whole or not at all, and a file that does not read
back whole is built again.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import posixpath
import struct
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from common.files import write_atomically

log = logging.getLogger(__name__)

MAGIC = b"CSPRESNET-SAMPLE-INDEX-2\n"
ALIGN = 64
Sample = Tuple[str, int]
Identity = Tuple[int, int, int]


class Member(NamedTuple):
    """A sample inside a container, as a source lists it."""

    target: int
    name: str  # '<wnid>/<file>' or the tar member's name: what warnings and reports show
    container: int  # its position in the index's folders
    offset: int
    size: int
    problem: str = ""  # why it cannot be read, known when indexing
    method: int = 0  # 0 stored, 8 deflated (a zip's)
    length: int = -1  # its bytes once inflated


class SampleIndex(Sequence):
    """The samples in order: sample i is folders[folder_of[i]]/<its name>, of class targets[i]."""

    def __init__(self, folders: List[str], folder_of: np.ndarray, targets: np.ndarray, names: np.ndarray,
                 starts: np.ndarray, kind: str = "files", arrays: Optional[Dict[str, np.ndarray]] = None,
                 identities: Optional[List[Identity]] = None, problems: Optional[Dict[int, str]] = None,
                 classes: Optional[List[str]] = None, warnings: Sequence[Tuple[int, str]] = ()):
        self.folders, self.kind = folders, kind
        self.folder_of, self.targets, self.names, self.starts = folder_of, targets, names, starts
        self.arrays = arrays or {}  # members: offset, size, method, length
        self.identities = [tuple(each) for each in identities or []]  # members: each container's, when indexed
        self.problems = problems or {}
        self.classes = classes
        self.warnings = [(int(c), text) for c, text in warnings]  # (container, what is wrong with it)
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        return f"{self.folders[self.folder_of[index]]}/{self.name(index)}", int(self.targets[index])

    def name(self, index: int) -> str:
        return self.names[self.starts[index]:self.starts[index + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]

    def __add__(self, other: Sequence[Sample]) -> List[Sample]:  # as lists of samples add up
        return list(self) + list(other)

    def __radd__(self, other: Sequence[Sample]) -> List[Sample]:
        return list(other) + list(self)

    @classmethod
    def from_rows(cls, folders: List[str], folder_of: Sequence[int], names: Sequence[str], targets: Sequence[int],
                  **fields: Any) -> "SampleIndex":
        """Sample i: folders[folder_of[i]]/names[i], of class targets[i]; `fields` as __init__'s."""
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        starts = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=starts[1:])
        return cls(list(folders), np.asarray(folder_of, dtype=np.int32).reshape(-1),
                   np.asarray(targets, dtype=np.int32).reshape(-1), np.frombuffer(b"".join(encoded), dtype=np.uint8),
                   starts, **fields)

    @classmethod
    def from_members(cls, containers: List[str], identities: List[Identity], members: Sequence[Member],
                     **fields: Any) -> "SampleIndex":
        """The samples inside `containers`, in the order of `members`."""
        arrays = {key: np.array([getattr(m, key) for m in members], dtype=np.int64)
                  for key in ("offset", "size", "method", "length")}
        return cls.from_rows(containers, [m.container for m in members], [m.name for m in members],
                             [m.target for m in members], kind="members", arrays=arrays, identities=identities,
                             problems={i: m.problem for i, m in enumerate(members) if m.problem}, **fields)

    @classmethod
    def from_names(cls, folders: List[str], names_per_folder: Sequence[List[str]], targets: Sequence[int]) -> "SampleIndex":
        """Folder k's files (names without a '/'), in order, are names_per_folder[k], all of
        class targets[k]. The fingerprint comes with it, joined a folder at a time (0.1 s for
        ImageNet's train set, against 1 s sample by sample)."""
        counts, targets = [len(names) for names in names_per_folder], list(targets)
        names = [name for each in names_per_folder for name in each]
        text = "".join(names)
        blob = text.encode("utf-8", "surrogateescape")
        lengths = map(len, names) if len(blob) == len(text) else (len(n.encode("utf-8", "surrogateescape")) for n in names)
        starts = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(lengths, dtype=np.int64, count=len(names)), out=starts[1:])
        index = cls(list(folders), np.repeat(np.arange(len(folders), dtype=np.int32), counts),
                    np.repeat(np.asarray(targets, dtype=np.int32), counts), np.frombuffer(blob, dtype=np.uint8), starts)
        digest = hashlib.sha1()
        for folder, each, target in zip(folders, names_per_folder, targets):
            if each:
                head, tail = f"{posixpath.basename(posixpath.normpath(folder))}/", f"\t{target}\n"
                digest.update((head + (tail + head).join(each) + tail).encode("utf-8", "surrogateescape"))
        index._fingerprint = f"{len(names)}:{digest.hexdigest()}"
        return index

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "SampleIndex":
        """Files from (path, class) pairs in any order: each path cut into its folder and its name."""
        folders: Dict[str, int] = {}
        folder_of, names = [], []
        for path, _ in samples:
            folder, _, name = path.rpartition("/")
            folder_of.append(folders.setdefault(folder, len(folders)))
            names.append(name)
        return cls.from_rows(list(folders), folder_of, names, [target for _, target in samples])

    def fingerprint(self) -> str:
        """Changes when any file is added, removed or relabelled: then sample indices moved.
        Only a sample's folder name and file name count, not where the dataset is mounted:
        sha1 over '<parent folder name>/<file name>\t<class>\n' per sample, what checkpoints
        have always recorded (a member named '<wnid>/<file>' counts as that folder's file)."""
        if self._fingerprint is None:
            digest = hashlib.sha1()
            blob, starts = self.names.tobytes(), self.starts.tolist()
            parents = [posixpath.basename(posixpath.normpath(folder)).encode("utf-8", "surrogateescape")
                       for folder in self.folders]
            for index, (folder, target) in enumerate(zip(self.folder_of.tolist(), self.targets.tolist())):
                name, parent = blob[starts[index]:starts[index + 1]], parents[folder]
                if b"/" in name:  # a tar member in a folder of its own: that folder is the parent
                    if b"/." in name or b"//" in name or name.startswith(b"."):
                        name = posixpath.normpath(name)
                    head, name = name.rsplit(b"/", 1) if b"/" in name else (b"", name)
                    parent = head.rsplit(b"/", 1)[-1] if head else parent
                digest.update(b"%s/%s\t%d\n" % (parent, name, target))
            self._fingerprint = f"{len(self)}:{digest.hexdigest()}"
        return self._fingerprint

    # ------------------------------------------------------------------------- the cache file

    def header(self, key: Any) -> Dict[str, Any]:
        return dict(key=key, kind=self.kind, folders=self.folders, identities=self.identities, problems=self.problems,
                    classes=self.classes, warnings=self.warnings, fingerprint=self.fingerprint())

    def save(self, path: Path, key: Any) -> None:
        """Whole or not at all; `key` says what the index was built from (to tell staleness)."""
        arrays = dict(folder_of=self.folder_of, targets=self.targets, names=self.names, starts=self.starts,
                      **self.arrays)
        layout, offset = {}, 0
        for name, array in arrays.items():
            layout[name] = [array.dtype.str, offset, len(array)]
            offset += -(-array.nbytes // ALIGN) * ALIGN
        header = json.dumps(dict(self.header(key), arrays=layout)).encode()
        start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN

        def write(handle) -> None:
            handle.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for name, array in arrays.items():
                handle.seek(start + layout[name][1])
                handle.write(np.ascontiguousarray(array).tobytes())
            handle.truncate(start + offset)

        write_atomically(path, write)

    @classmethod
    def load(cls, path: Path) -> Tuple["SampleIndex", Any]:
        """The index mapped from its file, and the key it was built from; ValueError if the
        file is not a whole index of this version (a junk or truncated cache)."""
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < len(MAGIC) + 8:
                raise ValueError(f"{size} bytes, too short")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if mapped[:len(MAGIC)] != MAGIC:
            raise ValueError("not a sample index of this version")
        length = struct.unpack("<Q", mapped[len(MAGIC):len(MAGIC) + 8])[0]
        header = json.loads(bytes(mapped[len(MAGIC) + 8:len(MAGIC) + 8 + length]))
        start = -(-(len(MAGIC) + 8 + length) // ALIGN) * ALIGN
        arrays = {}
        for name, (dtype, offset, count) in header["arrays"].items():
            dtype = np.dtype(dtype)
            if start + offset + count * dtype.itemsize > size:
                raise ValueError(f"cut short: its array {name} ends past the file's {size} bytes")
            arrays[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=start + offset)
        base = [arrays.pop(name) for name in ("folder_of", "targets", "names", "starts")]
        index = cls(header["folders"], *base, kind=header["kind"], arrays=arrays, identities=header["identities"],
                    problems={int(i): why for i, why in header["problems"].items()}, classes=header["classes"],
                    warnings=header["warnings"])
        if len(index.starts) != len(index) + 1 or len(index.folder_of) != len(index):
            raise ValueError("its arrays disagree in length")
        index._fingerprint = header["fingerprint"]
        return index, header["key"]


def fingerprint_of(samples: Sequence[Sample]) -> str:
    """A set's fingerprint, as checkpoints record it (SampleIndex.fingerprint); an index
    knows its own, kept in its cache file (8 s at ImageNet's size otherwise)."""
    return (samples if isinstance(samples, SampleIndex) else SampleIndex.from_samples(samples)).fingerprint()


# ----------------------------------------------------------------------------- caching


def identity(stat: os.stat_result) -> Identity:
    """What tells a file that an index points into from any other: its size, modification
    time and change time. The change time is the kernel's own: a copy over the file that
    keeps its size and sets its old modification time (cp --preserve=timestamps) still
    changes it, and no program can set it back."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def files_key(*paths: Path) -> List[List]:
    """What an index of these files must match: each one's path and identity (-1s: absent)."""
    def one(path: Path) -> List:
        try:
            return [str(path), *identity(path.stat())]
        except FileNotFoundError:
            return [str(path), -1, -1, -1]

    return [one(path) for path in paths]


def absolute(path: Path) -> Path:
    """`path` from the root, as indexes name their data: the same data named by a relative
    path and by an absolute one shares one index. Links are kept (no resolve()), so that a
    path stays the one the user gave, and works where a magic link (/proc/PID/root) is in it."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def cache_places(root: Path, name: str, index_dir: str = "") -> List[Path]:
    """Where the index `name` of the data at `root` may be cached, in the order they are read:
    in `index_dir` (data.index_dir) when set; else beside the data (root/.cspresnet_index/),
    then the per-user cache. The same names for every rank of every node that reads the folder."""
    root = absolute(root)
    tag = f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"
    if index_dir:
        return [Path(index_dir).expanduser() / tag / name]
    user = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cspresnet" / "index" / tag / name
    beside = root / ".cspresnet_index" / name
    return [beside, user] if os.access(root, os.W_OK) or beside.parent.is_dir() else [user]


def cache_file(root: Path, name: str, index_dir: str = "") -> Path:
    """Where the index `name` of the data at `root` is written: the user's cache where the
    data's folder is read-only."""
    places = cache_places(root, name, index_dir)
    return places[0] if len(places) == 1 or os.access(absolute(root), os.W_OK) else places[-1]


Build = Callable[[Optional[SampleIndex]], Tuple[SampleIndex, Any]]


def cached(what: str, root: Path, name: str, key: Any, build: Build, index_dir: str = "") -> SampleIndex:
    """The index `name` of the data at `root` (`what`, in words): read from a cache file built
    from `key`, else built by one process while the others (ranks, nodes) wait on a lock and
    then read what it wrote, and cached for every later start. `build(previous)` gets the
    out-of-date index, if any, to take what is still true from it, and returns the index and
    the key to cache it under (None: do not cache it). A stale cache where nothing can be
    written (a read-only dataset) is passed over for the user's, not rebuilt at every start.
    The index's warnings are said at every start, as when it was built."""
    started, previous = time.perf_counter(), None
    for place in cache_places(root, name, index_dir):
        found, current = read_cache(place, key)
        if current:
            return said(found, what, started, place)
        previous = previous or found
    target = cache_file(root, name, index_dir)
    log.info("indexing %s (once: cached in %s)", what, target)
    with locked(target):
        found, current = read_cache(target, key)  # another process may have built it while this one waited
        if current:
            return said(found, what, started, target)
        found, built_from = build(previous or found)
        save(found, target, built_from)
    return said(found, what, started)


def save(index: SampleIndex, path: Path, key: Any) -> None:
    """A cache that cannot be written costs the next start a build, not this one."""
    if key is None:
        return
    try:
        index.save(path, key)
    except OSError as exc:
        log.warning("could not cache the index in %s (%s): the next start builds it again; set data.index_dir to a "
                    "writable folder", path, exc.strerror or exc)


def read_cache(path: Path, key: Any) -> Tuple[Optional[SampleIndex], bool]:
    """The index cached at `path` if it reads back whole, and whether it was built from `key`."""
    try:
        index, built_from = SampleIndex.load(path)
        if built_from == key:
            return index, True
        log.info("the index %s is out of date: the data changed since it was built", path)
        return index, False
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the index %s cannot be read (%s): indexing again", path, exc)
    return None, False


def said(index: SampleIndex, what: str, started: float, place: Optional[Path] = None) -> SampleIndex:
    """The index, with what the start says of it: where it came from, how long it took, and
    what is wrong with the data (at every start, as when it was built)."""
    where = f"read from {place}" if place else "built"
    log.info("indexed %s: %d samples %s in %.2f s", what, len(index), where, time.perf_counter() - started)
    for _, warning in index.warnings:
        log.warning("%s", warning)
    if index.problems:
        first, why = min(index.problems.items())
        log.warning("%d of the %d samples of %s cannot be read and will be skipped and counted as unreadable, e.g. "
                    "%s: %s", len(index.problems), len(index), what, index[first][0], why)
    return index


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One process builds an index while the others (ranks, nodes) wait for it; where the
    filesystem cannot lock, each builds its own (the writes are atomic either way)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process (a rank, a node) to build %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
