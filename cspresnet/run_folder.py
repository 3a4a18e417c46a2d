"""A run folder belongs to one run, whose checkpoints are pruned without ever losing the last good one
(docs/training.md, "The run folder"). Only rank 0 touches it; the other ranks follow its decisions."""
import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from common.errors import CheckpointError, RunFolderError
from common.files import is_disk_full, remove_leftovers, unless_disk_full, write_atomically

from .checkpoint import TrainingCheckpoint, load_checkpoint, read_training_checkpoint, save_checkpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
LOCK_FILE = ".lock"
STATUS_FILE = "status"
SEGMENTS_FILE = "segments.jsonl"
# Files that hold a trained result: never started over, never overwritten by another run.
RESULT_FILES = ("last.pt", "best.pt", "summary.csv")
OTHER_RUN_FILES = ("recipe.yaml", SEGMENTS_FILE, STATUS_FILE)


class CheckpointFolder:
    """step-<N>.pt files, written whole, then linked as last.pt (and best.pt), then the oldest beyond
    `keep_last` deleted. A full disk skips the save and deletes nothing: the previous checkpoints stay good."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder, self.keep_last = Path(folder), keep_last

    def step_files(self) -> List[Tuple[int, Path]]:
        matches = [STEP_FILE.match(path.name) for path in self.folder.glob("step-*.pt")]  # none without the folder
        return sorted((int(match.group(1)), self.folder / match.group(0)) for match in matches if match)

    def save(self, state: Dict[str, Any], step: int, is_best: bool = False) -> Optional[Path]:
        """The saved file, or None when the disk was full."""
        path = self.folder / f"step-{step:08d}.pt"
        try:
            save_checkpoint(state, path)
            self.link(path, "last.pt")
            if is_best:
                self.link(path, "best.pt")
        except (OSError, RuntimeError) as exc:
            if not is_disk_full(exc):
                raise
            remove_leftovers(self.folder)
            log.warning("disk full in %s; checkpoint of step %d not written, earlier checkpoints kept, training goes "
                        "on and the next checkpoint tries again", self.folder, step)
            return None
        files = self.step_files()
        for _, old in files[: max(0, len(files) - self.keep_last)]:
            old.unlink(missing_ok=True)  # last.pt and best.pt are links: their data stays
        return path

    def link(self, source: Path, name: str) -> None:
        """`name` becomes `source` in one atomic rename (a hard link, or a copy where there are none)."""
        tmp = self.folder / f".{name}.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError as exc:
            if is_disk_full(exc):
                raise
            shutil.copyfile(source, tmp)
        os.replace(tmp, self.folder / name)

    def newest_loadable(self, read: Callable[[Path], T] = load_checkpoint) -> Optional[Tuple[Path, T]]:
        """last.pt, or else the newest step file, that `read` accepts (it raises CheckpointError otherwise)."""
        for path in [self.folder / "last.pt"] + [path for _, path in reversed(self.step_files())]:
            if path.is_file():
                try:
                    return path, read(path)
                except CheckpointError as exc:
                    log.warning("skipping unreadable checkpoint: %s", exc)
        return None


def run_files(folder: Path) -> List[str]:
    return sorted(path.name for path in folder.glob("*")  # glob: nothing where there is no folder
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
        self.resumed: Optional[Tuple[Path, TrainingCheckpoint]] = None  # the checkpoint the run goes on from

    def lock(self) -> None:
        """A POSIX record lock: the kernel drops it however the process dies, forked loader workers do not
        inherit it, and it works across hosts on NFS. A second job on the folder is refused, naming the holder."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--output {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
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
        remove_leftovers(self.path)  # what a kill during a save left: never complete
        holder = f"host {socket.gethostname()} pid {os.getpid()}\n".encode()
        unless_disk_full(lambda: os.pwrite(fd, holder.ljust(80), 0), "the lock holder's name")

    def close(self) -> None:
        """The lock goes when the process does; a caller that goes on (a test, a notebook) lets it go here."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def failure_recorded(self, enabled: bool) -> Iterator[None]:
        """An error that ends the run leaves 'failed: <its last line>' in the status, if the folder holds a run."""
        try:
            yield
        except BaseException as exc:
            if enabled and run_files(self.path):
                last_line = (str(exc).strip().splitlines() or ["no message"])[-1]
                try:
                    self.set_status(f"failed: {type(exc).__name__}: {last_line}")
                except OSError as status_error:  # a read-only folder: the first error is the one to tell
                    log.warning("status not written: %s", status_error)
            raise

    def choose_start(self, resume: Optional[str]) -> Optional[Tuple[Path, TrainingCheckpoint]]:
        """The checkpoint to continue from, or None to start; refuses a new run on top of another run's files."""
        found = run_files(self.path)
        if resume is None:
            if found and found != [STATUS_FILE]:  # a status alone: a start stopped before it trained
                raise RunFolderError(f"{self.path} already holds a run ({', '.join(found)}); continue it with "
                                     f"--resume auto, or pass --output NEW_FOLDER to start another")
            return None
        if resume != "auto":
            path = Path(resume)
            if path.resolve().parent != self.path.resolve() and holds_results(found):  # not a checkpoint of this run
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

    def record_start(self, recipe: Dict[str, Any], recipe_yaml: str, world_size: int, notes: List[str],
                     trains: bool) -> None:
        """recipe.yaml is the resolved recipe the run started with (a resume never rewrites it)."""
        step = self.resumed[1].position.step if self.resumed else 0
        if self.resumed is None:
            unless_disk_full(lambda: write_atomically(self.path / "recipe.yaml", recipe_yaml), "recipe.yaml")
        if not trains:
            return
        record = dict(start_step=step, started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      host=socket.gethostname(), world_size=world_size,
                      resumed_from=str(self.resumed[0]) if self.resumed else None,
                      argv=sys.argv, inexact=notes, recipe=recipe)

        def add_segment() -> None:
            with open(self.path / SEGMENTS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")

        unless_disk_full(add_segment, f"{SEGMENTS_FILE} entry of the segment from step {step}")
        self.set_status(f"running from step {step}")

    def set_status(self, text: str) -> None:
        """Atomic; on a full disk over the old line in its place, so that it does not go on claiming an old state."""
        line = text.replace("\n", " ") + "\n"
        try:
            write_atomically(self.path / STATUS_FILE, line)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            unless_disk_full(lambda: self.overwrite_status(line), f"status '{text}'")

    def overwrite_status(self, line: str) -> None:
        """Needs no new block on a full disk while the line fits the file's last one (not atomic)."""
        with open(self.path / STATUS_FILE, "r+b") as handle:  # "r+": the file as it is, not truncated to 0 first
            handle.write(line.encode())
            handle.truncate()
