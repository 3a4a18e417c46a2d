"""What validate.py reports beyond top-1/top-5: ImageNet-ReaL accuracy, a row of timm's results-imagenet.csv."""
import csv
import json
import os
import pkgutil
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.(JPEG|jpg)$", re.IGNORECASE)  # .jpg: inside tar shards
TIMM_RESULTS_COLUMNS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                        "interpolation"]


def load_real_labels() -> List[List[int]]:
    """ImageNet-ReaL (Beyer et al. 2020) as timm ships it: the acceptable classes of
    ILSVRC2012_val_{i+1:08d}.JPEG, empty where the raters found none."""
    return json.loads(pkgutil.get_data("timm.data", "_info/imagenet_real_labels.json").decode("utf-8"))


def real_accuracy(predictions: torch.Tensor, paths: Sequence[str],
                  real_labels: Optional[List[List[int]]] = None) -> Dict[str, float]:
    """ReaL top-1/top-5 over the images that have ReaL labels, as timm computes them."""
    real_labels = load_real_labels() if real_labels is None else real_labels
    top1, top5 = [], []
    for predicted, path in zip(predictions.tolist(), paths):
        match = VAL_NAME.match(os.path.basename(path))
        if not match:
            raise ValueError(f"--real-labels needs ImageNet's validation file names (ILSVRC2012_val_*.JPEG), "
                             f"got {path}")
        labels = real_labels[int(match.group(1)) - 1]
        if labels:
            top1.append(predicted[0] in labels)
            top5.append(any(p in labels for p in predicted[:5]))
    count = len(top1)
    return {"real_top1": 100.0 * sum(top1) / max(count, 1), "real_top5": 100.0 * sum(top5) / max(count, 1),
            "real_images": count}


def timm_results_row(name: str, result, param_count: int, settings) -> Dict[str, object]:
    """`result`: validate's EvalResult; `settings`: its data section (the evaluation transform)."""
    return {"model": name, "top1": round(result.top1, 3), "top1_err": round(100 - result.top1, 3),
            "top5": round(result.top5, 3), "top5_err": round(100 - result.top5, 3),
            "param_count": round(param_count / 1e6, 2), "img_size": settings.eval_img_size,
            "crop_pct": settings.eval_crop_pct, "interpolation": settings.eval_interpolation}


def append_csv_row(path: Path, row: Dict[str, object]) -> None:
    """Under the file's own header (or the row's keys); a row with a column the header lacks is refused,
    since it would shift every later column of that line."""
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
