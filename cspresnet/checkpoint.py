"""Checkpoint files: written atomically, read without unpickling code, kept and pruned in
a run folder without ever losing the last good one."""
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .files import is_disk_full

log = logging.getLogger(__name__)

TRAIN_CHECKPOINT_FORMAT = "cspresnet-train-v1"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says which."""


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


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain data, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable .safetensors file: {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects, not only tensors and plain data, "
            f"and unpickling them could run code ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from None


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

    def newest_loadable(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """last.pt, or else the newest step file that loads; None when there is none."""
        candidates = [self.folder / "last.pt"] + [path for _, path in reversed(self.step_files())]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping unreadable checkpoint: %s", exc)
        return None
