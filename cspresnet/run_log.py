"""TensorBoard scalars, summary.csv (a row per epoch) and console lines; only the main rank writes."""
import contextlib
import csv
import io
import logging
import threading
from pathlib import Path
from typing import Dict, List, Optional

from torch.utils.tensorboard import SummaryWriter

from common.files import is_disk_full, unless_disk_full, write_atomically

log = logging.getLogger(__name__)


def quiet_tensorboard_threads() -> None:
    """TensorBoard's writer thread dies of a full disk with a traceback on stderr, which is left out: the
    writer raises the same error at its next call, where RunLog warns in one line and carries on."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        if not (type(args.thread).__module__.startswith("tensorboard.") and is_disk_full(args.exc_value)):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool, start_step: int = 0, rows: Optional[List[Dict]] = None):
        """A resume purges TensorBoard's events after `start_step` and rewrites summary.csv from `rows`."""
        quiet_tensorboard_threads()
        self.enabled, self.output_dir = enabled, Path(output_dir)
        self.csv_path = self.output_dir / "summary.csv"
        self.writer: Optional[SummaryWriter] = None
        self.purge_step: Optional[int] = start_step + 1
        if enabled:
            unless_disk_full(lambda: write_csv(self.csv_path, rows or []), "summary.csv")
            self._tensorboard({})

    def _tensorboard(self, values: Dict[str, float], step: int = 0, flush: bool = False, close: bool = False) -> None:
        """The writer dies with its first failed write: on a full disk it is made anew at the next epoch's end."""
        try:
            if self.writer is None:
                self.writer = SummaryWriter(str(self.output_dir), purge_step=self.purge_step)
                self.purge_step = None  # only the segment's first event file purges
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            if flush:
                self.writer.flush()
            if close:
                self.writer.close()
        except (OSError, RuntimeError) as exc:
            if not is_disk_full(exc):
                raise
            log.warning("disk full: TensorBoard events lost until the next epoch's end")
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(OSError, RuntimeError):  # its thread has already failed on the same full disk
                    writer.close()

    def step(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self._tensorboard({"train/loss": loss, "train/lr": lr}, step)
        log.info("step %d loss %.4f lr %.6g", step, loss, lr)

    def epoch(self, rows: List[Dict[str, float]]) -> None:
        """summary.csv written anew (a few hundred lines at most; one header for older versions' rows too)."""
        if not self.enabled:
            return
        row = rows[-1]
        unless_disk_full(lambda: write_csv(self.csv_path, rows), f"summary.csv row of epoch {row['epoch']}")
        # one x-axis for everything, so that a resume can purge by step
        self._tensorboard({f"epoch/{k}": v for k, v in row.items() if k != "step"}, int(row["step"]), flush=True)
        log.info(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def close(self) -> None:
        if self.writer is not None:
            self._tensorboard({}, close=True)


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    """Whole or not at all, under every column any row has (in order of appearance); no rows: no file."""
    if not rows:
        Path(path).unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(Path(path), text.getvalue())
