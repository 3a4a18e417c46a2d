"""What a run reports: TensorBoard scalars, summary.csv (a row per epoch) and console lines.
Only the main rank writes; the others get a RunLog that does nothing."""
import csv
import os
from pathlib import Path
from typing import Dict, List, Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool, resumed_at_step: Optional[int] = None,
                 rows: Optional[List[Dict]] = None):
        """A resumed run drops TensorBoard events after its checkpoint's step and rewrites
        summary.csv from the checkpoint's rows: the logs then read as if it never stopped."""
        self.enabled = enabled
        self.csv_path = Path(output_dir) / "summary.csv"
        self.writer: Optional[SummaryWriter] = None
        if enabled:
            purge = None if resumed_at_step is None else resumed_at_step + 1
            self.writer = SummaryWriter(str(output_dir), purge_step=purge)
            if resumed_at_step is not None:
                self._rewrite_csv(rows or [])

    def _rewrite_csv(self, rows: List[Dict]) -> None:
        if not rows:
            self.csv_path.unlink(missing_ok=True)
            return
        tmp = self.csv_path.with_name(".summary.csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            tqdm.write(f"step {step} loss {loss:.4f} lr {lr:.6g}")

    def epoch(self, row: Dict[str, float]) -> None:
        """Append one row to summary.csv, mirror it to TensorBoard, print it."""
        if not self.enabled:
            return
        new_file = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        step = int(row["step"])  # one x-axis for everything, so a resume can purge by step
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()
        tqdm.write(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
