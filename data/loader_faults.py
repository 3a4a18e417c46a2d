"""A loader that fails to deliver: it stalls, or its shared memory runs out.

A loader can block for good: a worker on a hung NFS or Lustre read, a worker that was
stopped (SIGSTOP, a debugger), or the training process itself reading such a file
(data.workers=0), or fetching a stopped worker's batch (its shared memory comes through a
thread of that worker, which then never answers). torch's DataLoader timeout covers only
the first of these. So the wait for each batch runs under an alarm (SIGALRM, in the main
thread): after data.loader_timeout_s it raises LoaderStallError wherever the wait is, and
the training loop can still save. Each dataset item records in shared memory which sample
its process is reading and since when, so that the error can say where the time went.

Batches reach the training process through /dev/shm. When it is full, the error comes
from wherever the next allocation happens (a worker's batch buffer, a queue's semaphore),
as a RuntimeError or a bare "No space left on device"; both become one error that says
what to change.
"""
import contextlib
import errno
import os
import signal
import threading
import time
from typing import Iterator, List, Sequence

import torch

from common.errors import ExitError, LoaderStallError, SharedMemoryError

SHARED_MEMORY_HINT = ("/dev/shm is too small for data.workers: lower it, or give the job more (Docker: "
                      "--shm-size=8g or --ipc=host)")
STATES = {"R": "running", "S": "sleeping", "D": "in state D: waiting on its filesystem, a hung network mount?",
          "T": "stopped", "t": "stopped", "Z": "dead"}


class ReadProgress:
    """How long a batch may take, and per loader worker (one slot for the training process
    when it has none) the sample being read, since when, and the worker's pid. The table
    lives in shared memory, made before the workers fork, so the training process reads
    what the workers write."""

    def __init__(self, workers: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.table = torch.full((max(workers, 1), 3), -1.0, dtype=torch.float64).share_memory_()

    @contextlib.contextmanager
    def reading(self, index: int) -> Iterator[None]:
        info = torch.utils.data.get_worker_info()
        slot = self.table.numpy()[info.id if info is not None else 0]  # a view: writes go to shared memory
        slot[:] = (index, time.time(), os.getpid())
        try:
            yield
        finally:
            slot[0] = -1

    def describe(self, samples: Sequence) -> str:
        """One line: each worker, its state, and the file it has been reading, if any."""
        now = time.time()
        parts: List[str] = []
        for worker, (index, since, pid) in enumerate(self.table.tolist()):
            who = f"worker {worker}" + (f" (pid {int(pid)}, {process_state(int(pid))})" if pid > 0 else "")
            if index >= 0:
                parts.append(f"{who} has been reading {samples[int(index)][0]} for {now - since:.0f} s")
            else:
                parts.append(f"{who} is reading no file")
        return f"the loader delivered no batch for {self.timeout_s:g} s (data.loader_timeout_s): " + "; ".join(parts)


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            code = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return STATES.get(code, f"state {code}")


class Batches:
    """A loader's batches. A batch that takes longer than the dataset's ReadProgress allows
    raises LoaderStallError, naming the workers and their files; a full /dev/shm raises
    SharedMemoryError."""

    def __init__(self, loader):
        self.loader = loader
        self.progress = getattr(loader.dataset, "progress", None)  # None: no time limit (a benchmark's Subset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        try:
            with self.deadline():
                iterator = iter(self.loader)  # starts the workers, on the first pass
            while True:
                with self.deadline():
                    batch = next(iterator, None)
                if batch is None:
                    return
                yield batch
        except (RuntimeError, OSError, ExitError) as exc:
            explained = self.explained(exc)
            if explained is exc:
                raise
            raise explained from None

    @contextlib.contextmanager
    def deadline(self) -> Iterator[None]:
        """An alarm for the wait: its handler raises in the main thread, which interrupts a
        blocked system call there (PEP 475 retries one only when the handler returns). The
        wait is counted in ticks, each adding at most two ticks' time: a job suspended and
        resumed (SLURM's suspend: SIGSTOP, then SIGCONT, to every process) finds one late
        tick at its resume, so the time it was stopped does not count as waiting."""
        if self.progress is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        limit = self.progress.timeout_s
        tick = min(1.0, limit / 4)
        waited, last = 0.0, time.monotonic()

        def counted(signum, frame):
            nonlocal waited, last
            now = time.monotonic()
            waited, last = waited + min(now - last, 2 * tick), now
            if waited >= limit:
                raise LoaderStallError(self.progress.describe(self.loader.dataset.samples))

        previous = signal.signal(signal.SIGALRM, counted)
        signal.setitimer(signal.ITIMER_REAL, tick, tick)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def explained(self, exc: BaseException) -> BaseException:
        """A full /dev/shm in words; an error of ours raised in a loader worker as its own line
        (the DataLoader hands it over with the worker's traceback in its message); any other
        as it was."""
        text = str(exc)
        if isinstance(exc, ExitError) and "Original Traceback" in text:
            return type(exc)(text.strip().splitlines()[-1].partition(": ")[2])
        if not isinstance(exc, LoaderStallError) and (
                "shared memory" in text or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)):
            last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
            return SharedMemoryError(f"a loader worker ran out of shared memory ({last}); {SHARED_MEMORY_HINT}")
        return exc
