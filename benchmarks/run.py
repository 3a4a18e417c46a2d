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
from cspresnet.recipe_files import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"


REUSED = {}  # command -> [results], from --reuse


def run(args, timeout: float = 600) -> dict:
    """One benchmark in a fresh process; its JSON result, or the error it ended with (one
    failed measurement must not cost the others, on a GPU lent for half an hour)."""
    command = [sys.executable, "-m", *map(str, args)]
    shown = "python -m " + " ".join(map(str, args))
    if REUSED.get(shown):
        result = dict(REUSED[shown].pop(0), command=shown, reused=True)
        print(json.dumps(result), flush=True)
        return result
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout} s: {shown}", file=sys.stderr, flush=True)
        return {"error": f"timed out after {timeout} s", "command": shown}
    if done.returncode != 0:
        print(f"failed: {shown}\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return {"error": (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1][:200],
                "command": shown}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = shown
    print(json.dumps(result), flush=True)
    return result


def median_of(rounds: int, *commands):
    """Each command `rounds` times, alternating; per command the run with the median rate."""
    runs = [[] for _ in commands]
    for _ in range(rounds):
        for index, command in enumerate(commands):
            runs[index].append(run(command))
    medians = []
    for results in runs:
        good = [r for r in results if "error" not in r]
        key = "images_per_s" if good and "images_per_s" in good[0] else "ours_images_per_s"
        medians.append(sorted(good, key=lambda x: x[key])[len(good) // 2] if good else results[0])
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="an ImageNet-layout folder (default: generate bench_imagenet/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/<date>-<device>[-N].md)")
    parser.add_argument("--reuse", type=Path,
                        help="the output of an earlier run on this machine: its successful results are taken "
                             "(marked reused) instead of measured again")
    args = parser.parse_args()
    if args.reuse:
        for line in args.reuse.read_text().splitlines():
            if line.startswith("{") and '"command"' in line:  # run() prints successes only
                result = json.loads(line)
                REUSED.setdefault(result.pop("command"), []).append(result)
    gpu = torch.cuda.is_available()
    # A GPU eats 2,000 images in under a second: 14,000 there, so that the timed steps of the
    # end-to-end rows (5 + 100 of 128 images) stay in one epoch, and measure the steady state.
    data = args.data_dir or generate(Path("bench_imagenet"), classes=10, per_class=1400 if gpu else 200,
                                     val_per_class=300 if gpu else 50)
    facts = machine()
    rows = []

    def loader(pipeline, split, workers, *extra):
        return ["benchmarks.loader", "--data-dir", data, "--split", split, "--workers", workers, "--pipeline", pipeline,
                "--images", (2000 if split == "train" else 1000) if workers == 0 else 0, *extra]

    per_core = median_of(args.rounds, loader("ours", "train", 0), loader("timm", "train", 0),
                         loader("ours", "train", 0, "--whole-jpeg"))
    rows.append(("Loader, train, 1 core (`--workers 0`; last row: ours decoding whole files)", per_core))
    val = median_of(args.rounds, loader("ours", "val", 0, "--decode", "fast"), loader("timm", "val", 0),
                    loader("ours", "val", 0, "--decode", "full"))
    rows.append(("Loader, val, 1 core (ours fast / timm / ours exact)", val))
    parallel = median_of(args.rounds, loader("ours", "train", args.workers), loader("timm", "train", args.workers))
    # data.train_decode=gpu: what the workers and the hand-over to the training process sustain.
    gpu_half = median_of(args.rounds, loader("ours", "train", args.workers, "--decode", "gpu"))
    rows.append((f"Loader, train, {args.workers} workers (last row: the workers' half of GPU decode)",
                 parallel + gpu_half))
    epoch_ends = []
    if not gpu and parallel[0].get("images_per_s"):
        # A device that takes 2/3 of the loader's pace and no CPU, fed by the recipe's workers
        # in batches of 128: does it wait at the epochs' ends? (On a GPU, the real thing is timed.)
        recipe = load_recipe("cspresnet50.yaml")
        sleep = round(recipe.batch_size / (parallel[0]["images_per_s"] * 2 / 3), 4)
        stand_in = ["benchmarks.end_to_end", "--data-dir", data, "--steps", 45, "--sleep-step", sleep,
                    f"data.workers={recipe.data.workers}", "runtime.amp=none", f"model.num_classes={class_count(data)}"]
        epoch_ends = median_of(args.rounds, stand_in, [*stand_in, "--pass-per-epoch"])
        rows.append((f"Feeding a stand-in device (a sleep per step, no CPU; {recipe.data.workers} workers, batch "
                     f"{recipe.batch_size}) across epoch ends: one loader pass for the run, as train.py makes, "
                     f"and a pass per epoch", epoch_ends))

    rows.append(("Handing a batch from a worker to the training process (ms per batch of 128, 256 px)",
                 [run(["benchmarks.handover", "--way", way]) for way in ("ours", "label_tensors", "fresh", "per_image")]))

    model_args = ["benchmarks.model", "--batch-size", 128 if gpu else 16, "--steps", 20 if gpu else 3]
    if gpu:
        model_rows = [run([*model_args, "--amp", "bf16"]), run([*model_args, "--amp", "bf16", "--compile"])]
    else:
        model_rows = [run([*model_args, "--rounds", 2])]
    rows.append(("Model only, train step, synthetic tensors", model_rows))

    e2e = ["benchmarks.end_to_end", "--data-dir", data]
    classes = class_count(data)
    if gpu:
        common = ["--steps", 100, "batch_size=128", f"model.num_classes={classes}"]
        all_cores = [*common, f"data.workers={args.workers}"]
        # Fewer workers than cores leave the training process a core of its own.
        fewer = [[*common, f"data.workers={n}"] for n in sorted({max(1, args.workers - 2), max(1, args.workers // 2)})]
        e2e_rows = [run(command, timeout=180) for command in (
            [*e2e, *all_cores], [*e2e, *all_cores, "runtime.compile=true"], [*e2e, *all_cores, "data.train_decode=gpu"],
            [*e2e, "--pipeline", "timm", *all_cores], [*e2e, *all_cores, "runtime.deterministic=true"],
            [*e2e, "--recipe", "cspresnet50_ra.yaml", *all_cores], [*e2e, "--no-loader", *all_cores],
            *([*e2e, *options] for options in fewer))]
    else:
        common = ["--steps", 4, "--warmup", 1, "batch_size=16", f"data.workers={args.workers}", "runtime.amp=none",
                  f"model.num_classes={classes}"]
        e2e_rows = [run([*e2e, *common]), run([*e2e, "--pipeline", "timm", *common])]
    rows.append(("End to end, training with JPEGs", e2e_rows))
    if gpu:
        rows.append(("AMP against fp32 in validate.py: top-1 flips (stand-in weights, see amp_flips.py)",
                     [run(["benchmarks.amp_flips", "--data-dir", data, "--images", 3000, "--workers", args.workers,
                           "--amp", amp], timeout=240) for amp in ("bf16", "fp16")]))

    out = args.out or results_path(RESULTS, "gpu" if gpu else "cpu", datetime.now(timezone.utc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(facts, data, rows, per_core, parallel, model_rows, e2e_rows if gpu else None, epoch_ends))
    print(out)


def class_count(data) -> int:
    return len([p for p in (Path(data) / "train").iterdir() if p.is_dir()])


def results_path(folder: Path, device: str, now: datetime) -> Path:
    """<date>-<device>.md, or -2, -3, ...: a run never overwrites an earlier one's table."""
    path, number = folder / f"{now:%Y-%m-%d}-{device}.md", 2
    while path.exists():
        path, number = folder / f"{now:%Y-%m-%d}-{device}-{number}.md", number + 1
    return path


def ratio(a: dict, b: dict, key_a: str = "images_per_s", key_b: str = "images_per_s") -> str:
    if key_a not in a or not b.get(key_b):
        return "n/a (a measurement failed)"
    return f"**{a[key_a] / b[key_b]:.2f}x**"


def box_decoding_summary(per_core) -> list:
    """What decoding only the crops' boxes (data/jpeg_box.py) adds, from the per-core rows."""
    if len(per_core) < 3:
        return []
    if per_core[0].get("jpeg") != "box":
        return ["- loader, one core: data/jpeg_box.py could not be built here, so ours decoded whole files"]
    return [f"- loader, one core, ours decoding whole files (`--whole-jpeg`): {ratio(per_core[2], per_core[1])}; "
            f"decoding only the crops' boxes is {ratio(per_core[0], per_core[2])} that"]


def render(facts, data, rows, per_core, parallel, model_rows, e2e_rows=None, epoch_ends=()) -> str:
    lines = [f"# Benchmark, {facts['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "date"]
    lines += [f"- data: `{data}`", f"- command: `{' '.join(['python -m benchmarks.run', *sys.argv[1:]])}`", ""]
    lines += ["## Summary", "",
              f"- loader, one core: ours {per_core[0].get('images_per_s')} img/s, timm "
              f"{per_core[1].get('images_per_s')} img/s: {ratio(per_core[0], per_core[1])}",
              *box_decoding_summary(per_core),
              f"- loader, {parallel[0].get('workers')} workers: {ratio(parallel[0], parallel[1])}",
              f"- model-only train step, ours / timm: {ratio(model_rows[0], model_rows[0], 'ours_images_per_s', 'timm_images_per_s')}"]
    if epoch_ends:
        one_pass, per_epoch = epoch_ends
        lines += [f"- a stand-in device across {one_pass.get('epoch_ends', '?')} epoch ends, one loader pass / a pass "
                  f"per epoch: {ratio(one_pass, per_epoch)} (waiting for data: {one_pass.get('data_wait_fraction')} "
                  f"of the time against {per_epoch.get('data_wait_fraction')})"]
    if e2e_rows:  # GPU: does the GPU wait on data, and how do we stand against timm's path
        plain, compiled, gpu_decode, timm_path, deterministic, ra, no_loader, *fewer_workers = e2e_rows
        eager_model, compiled_model = model_rows
        of_model = lambda row, model: ratio(row, model, "images_per_s", "ours_images_per_s")  # noqa: E731
        lines += [
            f"- end to end / model only (bf16, channels_last, eager): {of_model(plain, eager_model)}",
            f"- our step without the loader / model only (eager): {of_model(no_loader, eager_model)}; end to end / "
            f"our step without the loader: {ratio(plain, no_loader)}",
            f"- end to end / model only (compiled): {of_model(compiled, compiled_model)}",
            f"- end to end with GPU decode / model only (eager): {of_model(gpu_decode, eager_model)}",
            f"- end to end, ours / timm's train.py path (both eager): {ratio(plain, timm_path)}",
            f"- end to end, deterministic kernels / default: {ratio(deterministic, plain)}",
            f"- end to end, RA recipe (RandAugment, mixup, erasing, EMA) / darknet recipe: {ratio(ra, plain)}"]
        lines += [f"- end to end with {row.get('workers', '?')} workers / model only (eager): {of_model(row, eager_model)}"
                  for row in fewer_workers]
    lines += [""]
    for title, results in rows:
        lines += [f"## {title}", ""]
        keys = list(dict.fromkeys(k for r in results for k in r if k != "command"))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in results]
        lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
