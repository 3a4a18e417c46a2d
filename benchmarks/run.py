"""Run the benchmarks and write a dated markdown table to benchmarks/results/.

    python -m benchmarks.run            # generates ImageNet-sized JPEGs in bench_imagenet/ first
    python -m benchmarks.run --data-dir /data/imagenet

Every figure comes from a fresh process (`python -m benchmarks.<part> ...`, the command is
in the table), ours and timm's measured alternately in the same run; each is the median
of --rounds runs. On a GPU it adds AMP, torch.compile, GPU decode and timm's own path.
"""
import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.jpegs import generate

RESULTS = Path(__file__).resolve().parent / "results"


def run(args) -> dict:
    command = [sys.executable, "-m", *map(str, args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["command"] = "python -m " + " ".join(map(str, args))
    return result


def median_of(rounds: int, *commands):
    """Each command `rounds` times, alternating; per command the run with the median rate."""
    runs = [[] for _ in commands]
    for _ in range(rounds):
        for index, command in enumerate(commands):
            runs[index].append(run(command))
    key = next(k for k in ("images_per_s", "ours_images_per_s") if k in runs[0][0])
    return [sorted(r, key=lambda x: x[key])[len(r) // 2] for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="an ImageNet-layout folder (default: generate bench_imagenet/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/<date>-<device>.md)")
    args = parser.parse_args()
    data = args.data_dir or generate(Path("bench_imagenet"), classes=10, per_class=200, val_per_class=50)
    gpu = torch.cuda.is_available()
    facts = machine()
    rows = []

    def loader(pipeline, split, workers, *extra):
        return ["benchmarks.loader", "--data-dir", data, "--split", split, "--workers", workers, "--pipeline", pipeline,
                *extra]

    per_core = median_of(args.rounds, loader("ours", "train", 0), loader("timm", "train", 0))
    rows.append(("Loader, train, 1 core (`--workers 0`)", per_core))
    val = median_of(args.rounds, loader("ours", "val", 0, "--decode", "fast"), loader("timm", "val", 0),
                    loader("ours", "val", 0, "--decode", "full"))
    rows.append(("Loader, val, 1 core (ours fast / timm / ours exact)", val))
    parallel = median_of(args.rounds, loader("ours", "train", args.workers), loader("timm", "train", args.workers))
    rows.append((f"Loader, train, {args.workers} workers", parallel))

    model_args = ["benchmarks.model", "--batch-size", 128 if gpu else 16, "--steps", 20 if gpu else 3]
    if gpu:
        model_rows = [run([*model_args, "--amp", "bf16"]), run([*model_args, "--amp", "bf16", "--compile"])]
    else:
        model_rows = [run([*model_args, "--rounds", 2])]
    rows.append(("Model only, train step, synthetic tensors", model_rows))

    e2e = ["benchmarks.end_to_end", "--data-dir", data]
    if gpu:
        common = [f"data.workers={args.workers}", "batch_size=128", "model.num_classes=1000"]
        e2e_rows = [run([*e2e, "--steps", 100, *common]),
                    run([*e2e, "--steps", 100, *common, "runtime.compile=true"]),
                    run([*e2e, "--steps", 100, *common, "data.train_decode=gpu"]),
                    run([*e2e, "--pipeline", "timm", "--steps", 100, *common])]
    else:
        classes = len([p for p in (Path(data) / "train").iterdir() if p.is_dir()])
        common = ["--steps", 4, "--warmup", 1, "batch_size=16", f"data.workers={args.workers}", "runtime.amp=none",
                  f"model.num_classes={classes}"]
        e2e_rows = [run([*e2e, *common]), run([*e2e, "--pipeline", "timm", *common])]
    rows.append(("End to end, training with JPEGs", e2e_rows))

    name = f"{datetime.now(timezone.utc):%Y-%m-%d}-{'gpu' if gpu else 'cpu'}.md"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(facts, data, rows, per_core, parallel, model_rows))
    print(out)


def render(facts, data, rows, per_core, parallel, model_rows) -> str:
    lines = [f"# Benchmark, {facts['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "date"]
    lines += [f"- data: `{data}`", "- command: `python -m benchmarks.run`", ""]
    ratio = per_core[0]["images_per_s"] / per_core[1]["images_per_s"]
    ratio_parallel = parallel[0]["images_per_s"] / parallel[1]["images_per_s"]
    lines += ["## Summary", "",
              f"- loader, one core: ours {per_core[0]['images_per_s']} img/s, timm {per_core[1]['images_per_s']} "
              f"img/s: **{ratio:.2f}x**",
              f"- loader, {parallel[0]['workers']} workers: **{ratio_parallel:.2f}x**",
              f"- model-only train step, ours / timm: **{model_rows[0]['ours_over_timm']:.3f}x**", ""]
    for title, results in rows:
        lines += [f"## {title}", ""]
        keys = [k for k in results[0] if k != "command"]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in results]
        lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
