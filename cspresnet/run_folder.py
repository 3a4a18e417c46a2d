"""A run folder belongs to one run: a lock held for the run's life, no start on top of
another run's files, a status line for requeue scripts, and the record of which recipe
trained which steps. Only rank 0 touches the folder; the other ranks follow its decisions."""
import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from data.errors import RunFolderError

from .checkpoint import STEP_FILE, CheckpointFolder
from .checkpoint_schema import TrainingCheckpoint, read_training_checkpoint
from .files import is_disk_full, overwrite_in_place, unless_disk_full, write_atomically

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
STATUS_FILE = "status"
SEGMENTS_FILE = "segments.jsonl"
# Files that hold a trained result: never started over, never overwritten by another run.
RESULT_FILES = ("last.pt", "best.pt", "summary.csv")
OTHER_RUN_FILES = ("recipe.yaml", SEGMENTS_FILE, STATUS_FILE)


def run_files(folder: Path) -> List[str]:
    """The names of the files in `folder` that belong to a run."""
    if not folder.is_dir():
        return []
    return sorted(path.name for path in folder.iterdir()
                  if path.name in RESULT_FILES + OTHER_RUN_FILES or STEP_FILE.match(path.name)
                  or path.name.startswith("events.out.tfevents."))


def holds_results(names: List[str]) -> bool:
    return any(name in RESULT_FILES or STEP_FILE.match(name) for name in names)


class RunFolder:
    """Rank 0's handle on the run folder."""

    def __init__(self, path: Path, keep_last: int):
        self.path = Path(path)
        self.checkpoints = CheckpointFolder(self.path, keep_last)
        self._lock_fd: Optional[int] = None

    def lock(self) -> None:
        """Hold the folder for this process's life. A POSIX record lock: the kernel drops it
        when the process dies however it dies, forked loader workers do not inherit it, and
        it works across hosts on NFS. A second job on the folder is refused, naming the holder."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--output {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"cannot write in the run folder {self.path}: {exc.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another job ({holder}); "
                                 f"wait for it to end, or pass --output NEW_FOLDER") from None
        self._lock_fd = fd
        holder = f"host {socket.gethostname()} pid {os.getpid()}\n".encode()
        unless_disk_full(lambda: os.pwrite(fd, holder.ljust(80), 0), "the lock holder's name")

    @contextlib.contextmanager
    def released_at_exit(self) -> Iterator[None]:
        """The lock goes when the process does; a caller that goes on (a test, a notebook)
        must let it go itself."""
        try:
            yield
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextlib.contextmanager
    def failure_recorded(self, enabled: bool) -> Iterator[None]:
        """Any error that ends the run leaves 'failed: ...' in the status file (rank 0)."""
        try:
            yield
        except BaseException as exc:
            if enabled:
                self.record_failure(exc)
            raise

    def choose_start(self, resume: Optional[str]) -> Optional[Tuple[Path, TrainingCheckpoint]]:
        """(path, state) of the checkpoint to continue from, or None to start the run; refuses
        anything that would put a new run on top of another run's files."""
        found = run_files(self.path)
        if resume is None:
            if found and found != [STATUS_FILE]:  # a status alone: a start stopped before it trained
                raise RunFolderError(f"{self.path} already holds a run ({', '.join(found)}); continue it with "
                                     f"--resume auto, or pass --output NEW_FOLDER to start another")
            return None
        if resume != "auto":
            path = Path(resume)
            inside = path.resolve().parent == self.path.resolve()
            if not inside and holds_results(found):
                raise RunFolderError(f"{self.path} holds another run ({', '.join(found)}); to continue from "
                                     f"{path}, pass --output NEW_FOLDER")
            return path, read_training_checkpoint(path)
        loaded = self.checkpoints.newest_loadable(read_training_checkpoint)
        if loaded is None and holds_results(found):
            if any(name.endswith(".pt") for name in found) or self.status().startswith("done"):
                raise RunFolderError(f"--resume auto: none of the checkpoints in {self.path} loads, but it holds a "
                                     f"run's results ({', '.join(found)}); refusing to start over on top of them. "
                                     f"Move them away, or pass --output NEW_FOLDER")
            log.warning("--resume auto: the run in %s never wrote a checkpoint (a full disk?): it starts again from "
                        "step 0, and its summary.csv is written anew as it goes", self.path)
        return loaded

    def status(self) -> str:
        try:
            return (self.path / STATUS_FILE).read_text().strip()
        except OSError:
            return ""

    def write_recipe(self, text: str) -> None:
        """recipe.yaml: the resolved recipe the run started with (a resume never rewrites it)."""
        unless_disk_full(lambda: (self.path / "recipe.yaml").write_text(text), "recipe.yaml")

    def set_status(self, text: str) -> None:
        """One line: 'running from step N', 'preempted at step N', 'done at step N' or
        'failed: ...'. Written atomically; on a full disk, over the old line in its place (no
        new block needed while it fits), so that it does not go on claiming an old state."""
        line = text.replace("\n", " ") + "\n"
        try:
            write_atomically(self.path / STATUS_FILE, line)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            unless_disk_full(lambda: overwrite_in_place(self.path / STATUS_FILE, line), f"status '{text}'")

    def record_failure(self, exc: BaseException) -> None:
        """'failed: <the error's last line>', in a folder that holds a run. A start that failed
        before it wrote anything (a typo in --data-dir) leaves the folder as it found it, for
        the corrected command; and a folder that cannot take even that (read-only) keeps
        the first error as the one to tell."""
        if not run_files(self.path):
            return
        last_line = (str(exc).strip().splitlines() or ["no message"])[-1]
        try:
            self.set_status(f"failed: {type(exc).__name__}: {last_line}")
        except OSError as status_error:
            log.warning("status not written: %s", status_error)

    def add_segment(self, start_step: int, recipe: Dict[str, Any], world_size: int, notes: List[str],
                    resumed_from: Optional[Path]) -> None:
        """Append this segment of training (who, when, from which step, with which recipe)
        to segments.jsonl; a run's recipe.yaml is its first segment's and is never rewritten."""
        record = dict(start_step=start_step, started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      host=socket.gethostname(), world_size=world_size, resumed_from=str(resumed_from) if resumed_from else None,
                      argv=sys.argv, inexact=notes, recipe=recipe)

        def write() -> None:
            with open(self.path / SEGMENTS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")

        unless_disk_full(write, f"{SEGMENTS_FILE} entry of the segment from step {start_step}")
