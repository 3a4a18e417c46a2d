"""The fast recipe against the darknet recipe, shrunk to the sample set (demo_fast.yaml and
demo.yaml), side by side in one run: best top-1 against wall time; and the model step's
images/s on this device at each training crop size, from which the GPU hours of the two
full recipes on ImageNet are estimated.

    python -m benchmarks.recipes --data-dir sample_imagenet --out /tmp/recipes
    python -m benchmarks.recipes --data-dir sample_imagenet --out /tmp/recipes --sizes 160 192 256  # model steps only at these

Each recipe runs as `python train.py` (its own process, one loader worker per core); the
per-epoch rows come from its summary.csv. The estimate scales an end-to-end rate measured at
256 px on a GPU (--gpu-rate, default: the H100's 2,278 images/s of 2026-11-24) by the model
step's rate at each size against 256 px on this device: an estimate, not a measurement.
"""
import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.common import machine, print_result
from benchmarks.model import train_steps
from cspresnet.model import build_model
from cspresnet.optim import build_optimizer
from cspresnet.recipe_files import load_recipe
from data.sample_data import generate

IMAGENET_TRAIN = 1_281_167


def run_recipe(recipe: str, data_dir: Path, output: Path, overrides: List[str]) -> Dict:
    """train.py on the sample set; its wall time and its rows."""
    command = [sys.executable, "train.py", "--recipe", recipe, "--data-dir", str(data_dir), "--output", str(output),
               *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    with open(output / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    elapsed, curve = 0.0, []
    for row in rows:
        elapsed += float(row["epoch_seconds"]) + float(row["eval_seconds"])
        curve.append([int(row["epoch"]), int(row["train_size"]), round(elapsed, 1), float(row["top1"])])
    return dict(recipe=recipe, wall_s=round(wall, 1), best_top1=max(float(row["top1"]) for row in rows),
                epochs=len(rows), curve=curve, command=" ".join(command[1:]))


def step_rate(size: int, batch: int, steps: int) -> float:
    """Model-step images/s (forward, backward, SGD) at `size` px on the CPU, fp32, channels_last."""
    torch.manual_seed(0)
    model = build_model(1000).to(memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, load_recipe("cspresnet50.yaml"))
    inputs = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch,))
    train_steps(model, optimizer, inputs, targets, "none", 1)  # warm-up
    return round(batch * steps / train_steps(model, optimizer, inputs, targets, "none", steps), 2)


def gpu_hours(recipe: str, rates: Dict[int, float], gpu_rate: float) -> float:
    """ImageNet epochs of `recipe` at the rate each crop size gets: gpu_rate at 256 px, scaled
    by the CPU model step's rate at that size against 256 px."""
    r = load_recipe(recipe)
    seconds = sum(IMAGENET_TRAIN / (gpu_rate * rates[r.data.train_size(epoch)] / rates[256])
                  for epoch in range(r.epochs))
    return round(seconds / 3600, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("sample_imagenet"))
    parser.add_argument("--out", type=Path, default=Path("runs/recipes_benchmark"))
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 160, 192, 256], help="model-step sizes (px)")
    parser.add_argument("--batch-size", type=int, default=16, help="model-step batch")
    parser.add_argument("--steps", type=int, default=3, help="model steps timed at each size")
    parser.add_argument("--gpu-rate", type=float, default=2278.0,
                        help="end-to-end images/s at 256 px on a GPU, for the estimate (H100, 2026-11-24)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both runs (e.g. epochs=2 for a rehearsal)")
    args = parser.parse_args(argv)
    if not (args.data_dir / "train").is_dir():
        generate(args.data_dir)
    print_result(dict(machine(), benchmark="recipes"))
    for recipe in ("demo.yaml", "demo_fast.yaml"):
        print_result(run_recipe(recipe, args.data_dir, args.out / Path(recipe).stem, args.overrides))
    if args.sizes:
        rates = {size: step_rate(size, args.batch_size, args.steps) for size in args.sizes}
        print_result(dict(model_step_images_per_s=rates, batch=args.batch_size, device="cpu"))
        if {160, 192, 256} <= set(rates):
            print_result(dict(estimate=True, gpu_rate_at_256=args.gpu_rate,
                              darknet_gpu_hours=gpu_hours("cspresnet50.yaml", rates, args.gpu_rate),
                              fast_gpu_hours=gpu_hours("cspresnet50_fast.yaml", rates, args.gpu_rate)))


if __name__ == "__main__":
    main()
