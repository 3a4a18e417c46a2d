"""What a run reports: TensorBoard scalars, summary.csv (a row per epoch) and console lines.
Only the main rank writes; the others get a RunLog that does nothing."""
import csv
from pathlib import Path
from typing import Dict, Optional

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path = Path(output_dir) / "summary.csv"
        self.writer: Optional[SummaryWriter] = SummaryWriter(str(output_dir)) if enabled else None

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

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
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()
        print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
