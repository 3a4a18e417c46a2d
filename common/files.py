"""How the project writes a file: whole or not at all, and what a full disk looks like."""
import errno
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger(__name__)
Content = Union[bytes, str, Callable[[BinaryIO], None]]


def write_atomically(path: Path, content: Content, durable: bool = False) -> None:
    """The whole new file or the old one, never half of one (a temporary name unique to this process, renamed).
    `durable`: fsync the file and the rename, so that a machine that loses power keeps it too. open() gives the
    file the umask's mode, as torch.save would (mkstemp's 0600 would hide checkpoints from the user's group)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def remove_leftovers(folder: Path) -> None:
    """The temporary files write_atomically leaves in `folder` when a process is killed
    during a write: never complete, never needed. For a folder one job owns."""
    for path in Path(folder).glob(".*.tmp"):
        path.unlink(missing_ok=True)


def is_disk_full(exc: BaseException) -> bool:
    """The whole chain of `exc`: torch.save reports a full disk as a RuntimeError ("unexpected pos")
    raised while handling the file's OSError(ENOSPC)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def unless_disk_full(write: Callable[[], object], what: str) -> None:
    """For the small files: a full disk costs the write and a warning, not the run (the checkpoints hold it)."""
    try:
        write()
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        log.warning("disk full: %s not written", what)
