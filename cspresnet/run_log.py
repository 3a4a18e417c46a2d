"""TensorBoard scalars, summary.csv (a row per epoch) and console lines; only the main rank writes."""
import contextlib
import csv
import io
import logging
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

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


class StepPosition(NamedTuple):
    epoch: int  # from 1, of `epochs`
    epochs: int
    step: int  # in the epoch, from 1, of `steps`
    steps: int
    batch_size: int  # global: the images a step trains on all processes


class StepClock:
    """The wall time since the last step line and the part of it blocked in next() on the loader (timm's data_time).
    Clock reads only: the loss read before each step line is the sync that makes it the device's time too."""

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, timed; an epoch's start restarts the interval (it does not span an evaluation)."""
        self.started, self.waited, self.steps = time.perf_counter(), 0.0, 0
        asked = self.started
        for batch in batches:
            self.waited, self.steps = self.waited + time.perf_counter() - asked, self.steps + 1
            yield batch
            asked = time.perf_counter()

    def lap(self, at: StepPosition) -> Tuple[Dict[str, float], str]:
        """images/s and data wait (TensorBoard's scalars), and the step line's words: those and the time left (the
        epoch's training; the run's, evaluations not counted) at this interval's pace."""
        now = time.perf_counter()
        seconds, left = now - self.started, at.steps - at.step
        rates = dict(images_per_s=self.steps * at.batch_size / seconds, data_wait=self.waited / seconds)
        step_s, self.started, self.waited, self.steps = seconds / max(self.steps, 1), now, 0.0, 0
        return rates, (f"epoch {at.epoch}/{at.epochs} step {at.step}/{at.steps} {rates['images_per_s']:.1f} img/s "
                       f"data wait {rates['data_wait']:.0%} epoch left {clock_time(left * step_s)} "
                       f"run left {clock_time((left + (at.epochs - at.epoch) * at.steps) * step_s)}")


def clock_time(seconds: float) -> str:
    """H:MM:SS, hours past 24 included: 123:04:05."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool, start_step: int = 0, rows: Optional[List[Dict]] = None):
        """A resume purges TensorBoard's events after `start_step` and rewrites summary.csv from `rows`."""
        quiet_tensorboard_threads()
        self.enabled, self.output_dir = enabled, Path(output_dir)
        self.csv_path = self.output_dir / "summary.csv"
        self.writer: Optional[SummaryWriter] = None
        self.purge_step: Optional[int] = start_step + 1
        self.clock = StepClock()
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

    def step(self, step: int, loss: float, lr: float, at: StepPosition) -> None:
        """Called after the loss is read: the clock's interval ends on the device's time."""
        if not self.enabled:
            return
        rates, pace = self.clock.lap(at)
        if self.writer is not None:
            self._tensorboard({"train/loss": loss, "train/lr": lr, **{f"train/{k}": v for k, v in rates.items()}}, step)
        log.info("step %d loss %.4f lr %.6g %s", step, loss, lr, pace)

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
