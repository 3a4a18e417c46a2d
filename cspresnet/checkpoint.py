"""Checkpoint files: written atomically, read without unpickling code, kept and pruned in
a run folder without ever losing the last good one."""
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch

from data.errors import CheckpointError

from .files import is_disk_full

log = logging.getLogger(__name__)
T = TypeVar("T")

def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip file
# What torch's weights-only unpickler says when a pickle names code it will not run, as
# opposed to bytes it cannot parse (a truncated or corrupt file).
FORBIDDEN = ("Unsupported global", "is blocked", "allowlisted", "unrecognized function")


def _first_line(exc: BaseException) -> str:
    """A library's error as one line, so that a CheckpointError stays one line: its type and
    its message's first non-empty line (junk bytes give bare ones like KeyError: '101')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _unpickler_error(exc: Exception) -> str:
    """The weights-only unpickler's own sentence, out of the paragraphs of advice torch wraps
    around it ("Weights only load failed ... WeightsUnpickler error: ...")."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed") and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please use", 1)[0] if lines else type(exc).__name__


def _missing_global(reason: str) -> Optional[str]:
    """The global a refused pickle names when it cannot be a real one, or None: a name cut
    short ("torc.") or missing from its module ("collections.Orde") is a truncated or damaged
    file, not code to fear. Looked up in sys.modules only, so that checking imports nothing."""
    match = re.search(r"GLOBAL (\S+) was not an allowed global", reason)
    if not match:
        return None
    parts = match.group(1).split(".")
    if "" in parts:  # "torc.": the file ended inside the name
        return match.group(1)
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            return match.group(1) if parts[i] not in vars(module) else None
    return None


def _looks_like_torch_save(head: bytes) -> bool:
    """A zip (torch.save today) or a pickle of protocol 2-5 (torch.save before 1.6, or with
    _use_new_zipfile_serialization=False): anything else is not worth unpickling."""
    return head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain data, never arbitrary code.

    Any file that does not load raises CheckpointError with one line naming the file and what
    is wrong with it, never the loader's own exception: `--resume auto` then falls back to an
    older checkpoint, and the scripts exit 2 with that line. Junk bytes make torch.load raise
    almost anything (KeyError, IndexError, UnicodeDecodeError, struct.error ...), hence the
    broad except around the load itself.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {_first_line(exc)}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except MemoryError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable .safetensors file: {_first_line(exc)}") from None
    if not _looks_like_torch_save(head):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip file nor a pickle): "
                              f"it starts with {head!r}")
    try:
        with warnings.catch_warnings():  # a pickle of protocol 4 or 5 warns before it fails or loads
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        reason = _unpickler_error(exc)
        missing = _missing_global(reason)
        if missing:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): its pickle "
                                  f"names {missing}, which does not exist") from None
        if any(marker in reason for marker in FORBIDDEN):
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects, not only tensors and plain data, "
                f"and unpickling them could run code ({reason})"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {reason}") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): "
                              f"{_first_line(exc)}") from None


STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def _replace_with_link(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` in one atomic rename (a hard link, or a copy
    where the filesystem has no hard links)."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if is_disk_full(exc):
            raise
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class CheckpointFolder:
    """A run folder's checkpoints: step-<N>.pt files, with last.pt and best.pt as links.

    Every save writes step-<N>.pt atomically, then points last.pt (and best.pt for a new
    best) at it, then deletes step files beyond the newest `keep_last`. A full disk skips
    the save with a message and deletes nothing, so training goes on and the previous
    checkpoints stay good.
    """

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def step_files(self) -> List[Tuple[int, Path]]:
        found = []
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                match = STEP_FILE.match(path.name)
                if match:
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def remove_partial_files(self) -> None:
        """Temporary files are what a kill during a save leaves; they are never complete."""
        if self.folder.is_dir():
            for path in self.folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)

    def save(self, state: Dict[str, Any], step: int, is_best: bool = False) -> Optional[Path]:
        """The saved file, or None when the disk was full."""
        path = self.folder / f"step-{step:08d}.pt"
        try:
            save_checkpoint(state, path)
            _replace_with_link(path, self.folder / "last.pt")
            if is_best:
                _replace_with_link(path, self.folder / "best.pt")
        except (OSError, RuntimeError) as exc:
            if not is_disk_full(exc):
                raise
            self.remove_partial_files()
            log.warning("disk full in %s; checkpoint of step %d not written, earlier checkpoints kept, training goes "
                        "on and the next checkpoint tries again", self.folder, step)
            return None
        files = self.step_files()
        for _, old in files[: max(0, len(files) - self.keep_last)]:
            old.unlink(missing_ok=True)  # last.pt and best.pt are links: their data stays
        return path

    def newest_loadable(self, read: Callable[[Path], T] = load_checkpoint) -> Optional[Tuple[Path, T]]:
        """last.pt, or else the newest step file, that `read` accepts (it raises
        CheckpointError for one it cannot use: junk, or not a training checkpoint); None
        when there is none."""
        candidates = [self.folder / "last.pt"] + [path for _, path in reversed(self.step_files())]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return path, read(path)
            except CheckpointError as exc:
                log.warning("skipping unreadable checkpoint: %s", exc)
        return None
