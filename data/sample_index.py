"""A split's samples as a few flat arrays, memory-mapped from a cache file.

A Python list of 1.28M (path, class) tuples costs 223 MB in every process, and a loader
worker that reads it touches the reference counts of its objects, so copy-on-write
duplicates their pages in every worker (pytorch/pytorch#13246): 8 ranks x 8 workers, about
12 GB for file names. A SampleIndex instead holds each sample's folder (a class folder, or a
tar shard), class and file name in numpy arrays and one byte buffer: 45 MB for ImageNet's
train set, no Python object per sample, pages that reading never writes, and, mapped from
its cache file, pages that every rank and worker of a node share. index[i] still gives the
(path, class) tuple that the rest of the code reads.

The cache file: MAGIC, the header's length (8 bytes, little-endian), the header (JSON: what
the index was built from, to tell when it is stale; the folders; the fingerprint; where
each array lies), then the arrays, each at a 64-byte boundary. It is written to a
temporary name and renamed, and anything that does not read back whole is rebuilt.
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"CSPRESNET-SAMPLE-INDEX-1\n"
ALIGN = 64
Sample = Tuple[str, int]


class SampleIndex(Sequence):
    """The samples in order: sample i is folders[folder_of[i]]/<its name>, of class targets[i].
    `arrays` may hold more per-sample arrays a source needs (a shard's offsets and sizes)."""

    def __init__(self, folders: List[str], folder_of: np.ndarray, targets: np.ndarray, names: np.ndarray,
                 starts: np.ndarray, **arrays: np.ndarray):
        self.folders = folders
        self.folder_of, self.targets, self.names, self.starts = folder_of, targets, names, starts
        self.arrays = arrays
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
                  **arrays: np.ndarray) -> "SampleIndex":
        """Sample i: folders[folder_of[i]]/names[i], of class targets[i]."""
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        starts = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=starts[1:])
        return cls(list(folders), np.asarray(folder_of, dtype=np.int32).reshape(-1),
                   np.asarray(targets, dtype=np.int32).reshape(-1), np.frombuffer(b"".join(encoded), dtype=np.uint8),
                   starts, **arrays)

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
    def from_samples(cls, samples: Sequence[Sample], **arrays: np.ndarray) -> "SampleIndex":
        """From (path, class) pairs in any order: each path cut into its folder and its name."""
        folders: Dict[str, int] = {}
        folder_of, names = [], []
        for path, _ in samples:
            folder, _, name = path.rpartition("/")
            folder_of.append(folders.setdefault(folder, len(folders)))
            names.append(name)
        return cls.from_rows(list(folders), folder_of, names, [target for _, target in samples], **arrays)

    def subset(self, rows: np.ndarray) -> "SampleIndex":
        """These rows, in this order (a held-out split)."""
        return SampleIndex.from_samples([self[int(row)] for row in rows],
                                        **{key: value[rows] for key, value in self.arrays.items()})

    def fingerprint(self) -> str:
        """Changes when any file is added, removed or relabelled: then sample indices moved.
        Only a sample's folder name and file name count, not where the dataset is mounted:
        sha1 over '<parent folder name>/<file name>\t<class>\n' per sample, what
        cspresnet.run_state.dataset_fingerprint has always computed from the tuples (as
        pathlib names the parent), here from the bytes: 1 s for ImageNet's train set."""
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

    def save(self, path: Path, source: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> None:
        """Atomically; `source` says what the index was built from (to tell staleness), `extra`
        what else the source needs back (a shard split's problems)."""
        arrays = dict(folder_of=self.folder_of, targets=self.targets, names=self.names, starts=self.starts,
                      **self.arrays)
        layout, offset = {}, 0
        for key, array in arrays.items():
            layout[key] = [array.dtype.str, offset, len(array)]
            offset += -(-array.nbytes // ALIGN) * ALIGN
        header = json.dumps(dict(source=source, folders=self.folders, fingerprint=self.fingerprint(),
                                 arrays=layout, extra=extra or {})).encode()
        start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(MAGIC + struct.pack("<Q", len(header)) + header)
                for key, array in arrays.items():
                    handle.seek(start + layout[key][1])
                    handle.write(np.ascontiguousarray(array).tobytes())
                handle.truncate(start + offset)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Tuple["SampleIndex", Dict[str, Any]]:
        """The index mapped from its file, and the file's header; ValueError if the file is not
        a whole index (a junk or truncated cache)."""
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
        for key, (dtype, offset, count) in header["arrays"].items():
            dtype = np.dtype(dtype)
            if start + offset + count * dtype.itemsize > size:
                raise ValueError(f"cut short: its array {key} ends past the file's {size} bytes")
            arrays[key] = np.frombuffer(mapped, dtype=dtype, count=count, offset=start + offset)
        base = [arrays.pop(key) for key in ("folder_of", "targets", "names", "starts")]
        index = cls(header["folders"], *base, **arrays)
        if len(index.starts) != len(index) + 1 or len(index.folder_of) != len(index):
            raise ValueError("its arrays disagree in length")
        index._fingerprint = header["fingerprint"]
        return index, header


def identity(stat: os.stat_result) -> Tuple[int, int, int]:
    """What tells a file that an index points into from any other: its size, modification
    time and change time. The change time is the kernel's own: a copy over the file that
    keeps its size and sets its old modification time (cp --preserve=timestamps) still
    changes it, and no program can set it back."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def absolute(path: Path) -> Path:
    """`path` from the root, as indexes name their data: the same data named by a relative
    path and by an absolute one shares one index. Links are kept (no resolve()), so that a
    path stays the one the user gave, and works where a magic link (/proc/PID/root) is in it."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def cache_places(root: Path, name: str, index_dir: str = "") -> List[Path]:
    """Where the index `name` of the data at `root` may be cached, in the order they are read:
    in `index_dir` (data.index_dir) when set; else beside the data (root/.cspresnet_index/),
    then the per-user cache. The last is written where the data's folder is read-only. The
    same names for every rank of every node that reads the same folder."""
    root = absolute(root)
    tag = f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"
    if index_dir:
        return [Path(index_dir).expanduser() / tag / name]
    user = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cspresnet" / "index" / tag / name
    beside = root / ".cspresnet_index" / name
    return [beside, user] if os.access(root, os.W_OK) or beside.parent.is_dir() else [user]


def cache_file(root: Path, name: str, index_dir: str = "") -> Path:
    """Where the index `name` of the data at `root` is written (cache_places)."""
    places = cache_places(root, name, index_dir)
    return places[0] if len(places) == 1 or os.access(absolute(root), os.W_OK) else places[-1]


Built = Tuple["SampleIndex", Dict[str, Any], Any]  # the index, what else its source needs back, the key it was built from


def cached(what: str, root: Path, name: str, key: Any, build: Callable[[], Built], index_dir: str = "",
           fresh: Callable[[Dict[str, Any]], bool] = lambda extra: True) -> Tuple["SampleIndex", Dict[str, Any]]:
    """The index `name` of the data at `root` (`what`, in words) and its `extra`: read from a cache file built
    from `key` (whose `extra` `fresh` accepts), else built by one process while the others
    (ranks, nodes) wait on a lock and then read what it wrote, and cached for every later
    start. A stale cache where nothing can be written (a read-only dataset) is passed over
    for the user's, not rebuilt at every start; a cache that cannot be written costs the next
    start a build, with a warning."""
    started = time.perf_counter()
    for place in cache_places(root, name, index_dir):
        found = read_current(place, key, fresh)
        if found is not None:
            log.info("indexed %s: %d samples read from %s in %.2f s", what, len(found[0]), place,
                     time.perf_counter() - started)
            return found
    target = cache_file(root, name, index_dir)
    log.info("indexing %s (once: cached in %s)", what, target)
    with locked(target):
        found = read_current(target, key, fresh)  # another process built it while this one waited
        if found is None:
            index, extra, built_from = build()
            try:
                index.save(target, {"key": built_from}, extra)
            except OSError as exc:
                log.warning("could not cache the index in %s (%s): the next start builds it again; set "
                            "data.index_dir to a writable folder", target, exc.strerror or exc)
            found = index, extra
    log.info("indexed %s: %d samples in %.1f s", what, len(found[0]), time.perf_counter() - started)
    return found


def read_current(path: Path, key: Any, fresh: Callable[[Dict[str, Any]], bool]) -> Optional[Tuple["SampleIndex", Dict]]:
    """The index cached at `path` and its extra, if it is whole and was built from `key`."""
    try:
        index, header = SampleIndex.load(path)
        if header["source"] == {"key": key} and fresh(header["extra"]):
            return index, header["extra"]
        log.info("the index %s is out of date: the data changed since it was built", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the index %s cannot be read (%s): indexing again", path, exc)
    return None


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
