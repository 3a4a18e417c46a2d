"""A split's samples as a few flat arrays, memory-mapped from a cache file: the one index that every source
builds, and the one routine that caches it. Unlike a list of (path, class) tuples, copied into every loader
worker, mapped arrays hold no Python object per sample and a node's processes share them (docs/performance.md,
which also gives the cache file's format)."""
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
Build = Callable[[Optional["SampleIndex"]], Tuple["SampleIndex", Any]]  # cached()'s: previous -> (index, key)


class Member(NamedTuple):
    target: int
    name: str  # '<wnid>/<file>' or the tar member's name: what warnings and reports show
    container: int  # its position in the index's folders
    offset: int
    size: int
    problem: str = ""  # why it cannot be read, known when indexing
    method: int = 0  # 0 stored, 8 deflated (a zip's)
    length: int = -1  # its bytes once inflated


class SampleIndex(Sequence):
    """Sample i is folders[folder_of[i]]/<its name>, of class targets[i] (kind `files`), or bytes inside that container
    (kind `members`) at `offset`, `size` long, stored or deflated (`method`, zipfile's numbers) into `length` bytes."""

    def __init__(self, folders: List[str], folder_of: np.ndarray, targets: np.ndarray, names: np.ndarray,
                 starts: np.ndarray, kind: str = "files", arrays: Optional[Dict[str, np.ndarray]] = None,
                 identities: Optional[List[Identity]] = None, problems: Optional[Dict[int, str]] = None,
                 classes: Optional[List[str]] = None, warnings: Sequence[Tuple[int, str]] = ()):
        self.folders, self.kind = folders, kind
        self.folder_of, self.targets, self.names, self.starts = folder_of, targets, names, starts
        self.arrays = arrays or {}  # members: offset, size, method, length
        self.identities = [tuple(each) for each in identities or []]  # members: each container's, when indexed
        self.problems, self.classes = problems or {}, classes  # {sample: why it cannot be read}, named classes
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

    def __add__(self, other: Sequence[Sample]) -> List[Sample]:  # as lists of samples add up
        return list(self) + list(other)

    @classmethod
    def from_rows(cls, folders: List[str], folder_of: Sequence[int], names: Sequence[str], targets: Sequence[int],
                  **fields: Any) -> "SampleIndex":
        text = "".join(names)
        blob = text.encode("utf-8", "surrogateescape")
        # One byte a character (ASCII, the usual case): no name is encoded on its own (1 s at ImageNet's size).
        lengths = map(len, names if len(blob) == len(text) else [n.encode("utf-8", "surrogateescape") for n in names])
        starts = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(lengths, dtype=np.int64, count=len(names)), out=starts[1:])
        return cls(list(folders), np.asarray(folder_of, dtype=np.int32).reshape(-1),
                   np.asarray(targets, dtype=np.int32).reshape(-1), np.frombuffer(blob, dtype=np.uint8), starts,
                   **fields)

    @classmethod
    def from_members(cls, containers: List[str], identities: List[Identity], members: Sequence[Member],
                     **fields: Any) -> "SampleIndex":
        arrays = {key: np.array([getattr(m, key) for m in members], dtype=np.int64)
                  for key in ("offset", "size", "method", "length")}
        return cls.from_rows(containers, [m.container for m in members], [m.name for m in members],
                             [m.target for m in members], kind="members", arrays=arrays, identities=identities,
                             problems={i: m.problem for i, m in enumerate(members) if m.problem}, **fields)

    @classmethod
    def from_names(cls, folders: List[str], names_per_folder: Sequence[List[str]],
                   targets: Sequence[int]) -> "SampleIndex":
        """Folder k's files (no '/' in a name) are names_per_folder[k], of class targets[k]; the fingerprint comes
        with it, joined a folder at a time (0.1 s for ImageNet's train set, not 1 s sample by sample)."""
        counts, targets = [len(names) for names in names_per_folder], list(targets)
        index = cls.from_rows(folders, np.repeat(np.arange(len(folders)), counts),
                              [name for each in names_per_folder for name in each], np.repeat(targets, counts))
        digest = hashlib.sha1()
        for folder, each, target in zip(folders, names_per_folder, targets):
            if each:
                head, tail = f"{posixpath.basename(posixpath.normpath(folder))}/", f"\t{target}\n"
                digest.update((head + (tail + head).join(each) + tail).encode("utf-8", "surrogateescape"))
        index._fingerprint = f"{len(index)}:{digest.hexdigest()}"
        return index

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "SampleIndex":
        """Files from (path, class) pairs in any order: each path cut into its folder and its name."""
        parts, folders = [path.rpartition("/") for path, _ in samples], {}
        folder_of = [folders.setdefault(folder, len(folders)) for folder, _, _ in parts]
        names = [name for _, _, name in parts]
        return cls.from_rows(list(folders), folder_of, names, [target for _, target in samples])

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or relabelled (sample indices moved), not where the data
        is mounted: sha1 over '<parent folder name>/<file name>\t<class>\n' per sample, as checkpoints
        have always recorded it (a member named '<wnid>/<file>' counts as that folder's file)."""
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

    def save(self, path: Path, key: Any) -> None:
        """Whole or not at all; `key` says what the index was built from (to tell staleness)."""
        arrays = dict(folder_of=self.folder_of, targets=self.targets, names=self.names, starts=self.starts,
                      **self.arrays)
        layout, offset = {}, 0
        for name, array in arrays.items():
            layout[name] = [array.dtype.str, offset, len(array)]
            offset += -(-array.nbytes // ALIGN) * ALIGN
        header = json.dumps(dict(key=key, kind=self.kind, folders=self.folders, identities=self.identities,
                                 problems=self.problems, classes=self.classes, warnings=self.warnings,
                                 fingerprint=self.fingerprint(), arrays=layout)).encode()
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
        """The index mapped from its file, and its key; ValueError for a junk or truncated cache."""
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
    """An index knows its fingerprint, kept in its cache file (8 s at ImageNet's size otherwise)."""
    return (samples if isinstance(samples, SampleIndex) else SampleIndex.from_samples(samples)).fingerprint()


def identity(stat: os.stat_result) -> Identity:
    """The change time is the kernel's own: a copy that keeps size and mtime (cp --preserve=timestamps) changes it."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def files_key(*paths: Path) -> List[List]:
    """What an index of these files must match: each one's path and identity (-1s: absent)."""
    key = []
    for path in paths:
        try:
            key.append([str(path), *identity(path.stat())])
        except FileNotFoundError:
            key.append([str(path), -1, -1, -1])
    return key


def absolute(path: Path) -> Path:
    """One index for a relative or absolute path; no resolve(): the user's path works through /proc/PID/root."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def cache_places(root: Path, name: str, index_dir: str = "") -> List[Path]:
    """Where an index may be cached, in reading order: `index_dir` if set; else beside the data, then the user's."""
    root = absolute(root)
    tag = f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"
    if index_dir:
        return [Path(index_dir).expanduser() / tag / name]
    user = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cspresnet" / "index" / tag / name
    beside = root / ".cspresnet_index" / name
    return [beside, user] if os.access(root, os.W_OK) or beside.parent.is_dir() else [user]


def cache_file(root: Path, name: str, index_dir: str = "") -> Path:
    """Where an index is written: the user's cache where the data's folder is read-only (a stale index beside
    the data is then passed over for it, not rebuilt at every start)."""
    places = cache_places(root, name, index_dir)
    return places[0] if len(places) == 1 or os.access(absolute(root), os.W_OK) else places[-1]


def cached(what: str, root: Path, name: str, key: Any, build: Build, index_dir: str = "") -> SampleIndex:
    """The index `name` of the data at `root` (`what`, in words), read from a cache built from `key`, or built
    by one process while the others (ranks, nodes) wait on a lock. `build(previous)` may reuse the out-of-date
    index and returns the index and the key to cache it under (None: not cached)."""
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
        try:  # a cache that cannot be written costs the next start a build, not this one
            if built_from is not None:
                found.save(target, built_from)
        except OSError as exc:
            log.warning("could not cache the index in %s (%s): the next start builds it again; set data.index_dir "
                        "to a writable folder", target, exc.strerror or exc)
    return said(found, what, started)


def read_cache(path: Path, key: Any) -> Tuple[Optional[SampleIndex], bool]:
    try:
        index, built_from = SampleIndex.load(path)
    except FileNotFoundError:
        return None, False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the index %s cannot be read (%s): indexing again", path, exc)
        return None, False
    if built_from != key:
        log.info("the index %s is out of date: the data changed since it was built", path)
    return index, built_from == key


def said(index: SampleIndex, what: str, started: float, place: Optional[Path] = None) -> SampleIndex:
    """Where the index came from, how long it took, and what is wrong with the data: at every start."""
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
    """Where the filesystem cannot lock, each process builds its own index (the writes are atomic anyway)."""
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
