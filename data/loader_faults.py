"""A loader that stalls (an alarm sees what torch's timeout cannot) or whose /dev/shm fills (docs/training.md)."""
import contextlib
import errno
import os
import signal
import threading
import time
from typing import Iterator, List, Sequence

import torch

from common.errors import ExitError, LoaderStallError, SharedMemoryError

KEPT_UNTIL_EXIT: List[object] = []
STATES = {"R": "running", "S": "sleeping", "D": "in state D: waiting on its filesystem, a hung network mount?",
          "T": "stopped", "t": "stopped", "Z": "dead"}


class ReadProgress:
    """How long a batch may take, and per worker (or the training process) what it reads since when, and its pid."""

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
        now = time.time()
        parts: List[str] = []
        for worker, (index, since, pid) in enumerate(self.table.tolist()):
            who = f"worker {worker}" + (f" (pid {int(pid)}, {process_state(int(pid))})" if pid > 0 else "")
            parts.append(f"{who} has been reading {samples[int(index)][0]} for {now - since:.0f} s" if index >= 0
                         else f"{who} is reading no file")
        return f"the loader delivered no batch for {self.timeout_s:g} s (data.loader_timeout_s): " + "; ".join(parts)


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            code = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return STATES.get(code, f"state {code}")


class Batches:
    """A loader's batches; LoaderStallError for one that is late, SharedMemoryError for a full /dev/shm."""

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
        except (RuntimeError, OSError, ExitError) as exc:  # a full /dev/shm fails wherever it next allocates
            text = str(exc)
            if isinstance(exc, ExitError) and "Original Traceback" in text:  # ours, from a worker: its own line
                raise type(exc)(text.strip().splitlines()[-1].partition(": ")[2]) from None
            if not isinstance(exc, LoaderStallError) and (
                    "shared memory" in text or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)):
                last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
                # A DataLoader iterator whose __init__ failed raises AttributeError from __del__; the traceback
                # holds it until exit, when torch's __del__ does nothing.
                KEPT_UNTIL_EXIT.append(exc.__traceback__)
                raise SharedMemoryError(f"a loader worker ran out of shared memory ({last}); /dev/shm is too small "
                                        f"for data.workers: lower it, or give the job more (Docker: --shm-size=8g or "
                                        f"--ipc=host)") from None
            raise

    @contextlib.contextmanager
    def deadline(self) -> Iterator[None]:
        """An alarm whose handler raises in the main thread, interrupting a blocked system call. Each tick
        adds at most two ticks' time, so the time a job was suspended (SIGSTOP, SIGCONT) does not count."""
        if self.progress is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        tick = min(1.0, self.progress.timeout_s / 4)
        waited, last = 0.0, time.monotonic()

        def counted(signum, frame):
            nonlocal waited, last
            now = time.monotonic()
            waited, last = waited + min(now - last, 2 * tick), now
            if waited >= self.progress.timeout_s:
                raise LoaderStallError(self.progress.describe(self.loader.dataset.samples))
        previous = signal.signal(signal.SIGALRM, counted)
        signal.setitimer(signal.ITIMER_REAL, tick, tick)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
