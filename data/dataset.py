"""The one dataset every source is read through: sample i's bytes (a file, or a member of a container at its
offset, inflated if deflated), decoded and augmented as a function of (seed, epoch, i) alone."""
import logging
import os
import random
import resource
import zlib
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import SourceChangedError

from .fast_decode import DECODE_ERRORS, ImageTransform
from .loader_faults import ReadProgress
from .sample_index import Identity, Sample, identity

log = logging.getLogger(__name__)


class UnreadableSample(OSError):
    """A sample its source cannot give (known when indexing, or found when read): counted like a broken JPEG."""


class ImageDataset(Dataset):
    """Samples (a SampleIndex, or (path, class) pairs) -> (image, target, index, error), by index or by
    (epoch, index): the sampler passes the epoch, so per-sample randomness survives persistent workers.
    An unreadable sample gives image None and the reason: one bad JPEG costs one sample, not the run."""

    def __init__(self, samples: Sequence[Sample], classes: List[str], transform: Optional[ImageTransform],
                 seed: Optional[int] = None):
        self.samples, self.classes, self.transform, self.seed = samples, classes, transform, seed
        self.members = getattr(samples, "kind", "files") == "members"
        self.files = OpenFiles(samples.folders, samples.identities) if self.members else None
        self.progress: Optional[ReadProgress] = None  # set by the loader that reads it (data.loaders.tracked)

    def __len__(self) -> int:
        return len(self.samples)

    def known_unreadable(self) -> Dict[int, str]:
        """{sample: why} of the samples known to be unreadable before any is read."""
        return getattr(self.samples, "problems", {})

    def read(self, index: int) -> bytes:
        if not self.members:
            with open(self.samples[index][0], "rb") as handle:
                return handle.read()
        if index in self.samples.problems:
            raise UnreadableSample(self.samples.problems[index])
        arrays = self.samples.arrays
        data = self.files.read(int(self.samples.folder_of[index]), int(arrays["offset"][index]),
                               int(arrays["size"][index]))
        if arrays["method"][index] == 8:  # zipfile.ZIP_DEFLATED
            try:
                data = zlib.decompress(data, -zlib.MAX_WBITS)
            except zlib.error as exc:
                raise UnreadableSample(f"its deflated bytes do not inflate ({exc}): the zip is damaged") from None
        if 0 <= arrays["length"][index] != len(data):
            raise UnreadableSample(f"{len(data)} bytes, not the {arrays['length'][index]} the zip lists")
        return data

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


class OpenFiles:
    """This process's open containers, opened on first use and kept (a forked worker opens its own); a sample is
    one pread(). Where even the hard open-file limit is too low, the least recently used one is closed."""

    def __init__(self, paths: List[str], identities: List[Identity]):
        self.paths, self.identities = paths, identities
        self.files: "OrderedDict[int, int]" = OrderedDict()
        self.owner = -1  # the process the descriptors belong to; the first read in a process opens its own

    def __getstate__(self) -> Dict:
        return dict(self.__dict__, files=OrderedDict(), owner=-1)

    def _descriptor(self, container: int) -> int:
        if self.owner != os.getpid():
            self.files, self.owner = OrderedDict(), os.getpid()
            self.capacity = open_file_capacity(len(self.paths))
        if container in self.files:
            self.files.move_to_end(container)
            return self.files[container]
        path = self.paths[container]
        if self.identities[container][0] < 0:
            raise UnreadableSample(f"{os.path.basename(path)} is gone: deleted or moved after it was indexed")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UnreadableSample(f"{path} is gone: deleted or moved after it was indexed") from None
        if len(self.files) >= self.capacity:
            os.close(self.files.popitem(last=False)[1])
        self.files[container] = fd
        return fd

    def read(self, container: int, offset: int, size: int) -> bytes:
        """Checks the file is the one indexed at every read (an fstat, ~1 us): a worker keeps it open all run."""
        fd = self._descriptor(container)
        if identity(os.fstat(fd)) != tuple(self.identities[container]):
            raise SourceChangedError(f"{self.paths[container]} changed after it was indexed (its size, modification "
                                     f"or change time): its offsets are stale; restart the run to index it again")
        data = os.pread(fd, size, offset)
        while len(data) < size:
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise UnreadableSample(f"cut short: {self.paths[container]} ends at byte {offset + len(data)}, "
                                       f"inside this member (bytes {offset} to {offset + size})")
            data += more
        return data


def open_file_capacity(files: int) -> int:
    """Raises the soft open-file limit up to the hard one if the containers need it, with room to spare."""
    spare = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < files + spare and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = files + spare if hard == resource.RLIM_INFINITY else min(hard, files + spare)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    capacity = files if soft == resource.RLIM_INFINITY else max(1, min(files, soft - spare))
    if capacity < files:
        log.warning("the open-file limit (ulimit -n %d) is too low to keep all %d files open: they will be "
                    "reopened; raise the hard limit", soft, files)
    return capacity


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on all three numbers, so augmentation is reproducible."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    mixed ^= mixed >> 31
    return mixed & (2**63 - 1)


@contextmanager
def seeded_randomness(seed: int, numpy: bool = True) -> Iterator[None]:
    """torchvision's and timm's augmentations draw from the global generators: seeded per sample, an image's
    augmentation depends on (seed, epoch, index) alone. The main process (workers=0) restores them, as training
    draws from them too. NumPy only if the transform uses it (~70 us); torch.manual_seed also seeds CUDA (~80 us)."""
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
