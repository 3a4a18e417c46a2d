"""Writing the run folder's files so that neither a crash nor a full disk costs more than
the write at hand."""
import csv
import errno
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, says the disk or quota is full.
    torch.save reports a full disk as a RuntimeError ("unexpected pos") raised while
    handling the file's OSError(ENOSPC), so the whole chain is looked at."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def unless_disk_full(write: Callable[[], None], what: str) -> None:
    """For the run folder's small files: a full disk costs that write and a warning, not the
    run (the checkpoints hold what they record)."""
    try:
        write()
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        log.warning("disk full: %s not written", what)


def write_atomically(path: Path, text: str) -> None:
    """The whole new text or the old file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def overwrite_in_place(path: Path, text: str) -> None:
    """Write over an existing small file's bytes: on a full disk this needs no new block as
    long as the text fits the file's last one (not atomic; for a status line only)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        data = text.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def append_csv_row(path: Path, row: Dict[str, object]) -> None:
    """One row under the file's own header (the row's keys when the file is new or empty); a
    row with a column the header lacks is refused, since appending it would shift every
    later column of that line."""
    path = Path(path)
    header = None
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), None)
    if header is not None and set(row) - set(header):
        raise ValueError(f"{path} has the columns {','.join(header)}; this row adds "
                         f"{', '.join(sorted(set(row) - set(header)))}: write it to a new file")
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header or list(row))
        if header is None:
            writer.writeheader()
        writer.writerow(row)


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    """All rows at once, atomically, under every column any row has (in the order they first
    appear; a row without one leaves it empty); no rows: no file."""
    if not rows:
        Path(path).unlink(missing_ok=True)
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
