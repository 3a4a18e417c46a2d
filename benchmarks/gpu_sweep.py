"""Every GPU speed lever of the trainer, measured by one command inside one short GPU lease,
written to one results file.

    python -m benchmarks.gpu_sweep                # on the GPU machine: about 7 minutes
    python -m benchmarks.gpu_sweep --rehearse     # on a CPU, at a tiny size: the harness only

Rows run in the order of what they tell (model-only eager and compiled at the darknet recipe's
128, then end to end at the best of those, then the rest), each in a child process of its own
(`python -m benchmarks.gpu_sweep model ...` or `python -m benchmarks.end_to_end ...`, the
command is in the table), killed at its own timeout. A row that fails, times out or is not
reached before --budget-s is spent says so, and the sweep goes on. Each figure is the median
of --windows timed windows after warm-up, with every window's rate beside it. The compiled
graphs are cached in the output folder (TORCHINDUCTOR_CACHE_DIR), so that a row that compiles
what an earlier row compiled, or a rerun, reuses it.

What it cannot measure on one GPU: DDP's switches (one process has no DDP), and 8 processes of
16 images. docs/performance.md says how to run it and which wheels to carry.
"""
import argparse
import json
import multiprocessing
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.common import machine, print_result, rehearsal_compile_backend
from benchmarks.jpegs import generate
from benchmarks.run import RESULTS, results_path

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Scale:
    """The sizes a sweep runs at: the GPU's, or the CPU rehearsal's (tiny, fp32, no inductor)."""

    img_size: int
    batches: tuple  # (the darknet pass, the darknet update, a large one)
    amp: str
    windows: int
    window_steps: int
    warmup: int
    e2e_window_steps: int
    classes: int
    per_class: int
    row_timeout_s: float
    more_batches: tuple  # model-only at these too, in each mode, last (the rehearsal has the same command)


GPU = Scale(256, (32, 128, 256), "bf16", windows=5, window_steps=10, warmup=5, e2e_window_steps=12, classes=16,
            per_class=600, row_timeout_s=240, more_batches=(32, 256))
REHEARSAL = Scale(32, (2, 4, 8), "none", windows=2, window_steps=1, warmup=1, e2e_window_steps=1, classes=2,
                  per_class=12, row_timeout_s=120, more_batches=())


@dataclass
class Row:
    group: str
    name: str
    command: List[str]
    result: Dict = field(default_factory=dict)

    @property
    def rate(self) -> Optional[float]:
        return self.result.get("images_per_s")


class Sweep:
    """Runs rows in child processes within a budget, and keeps what each gave."""

    def __init__(self, budget_s: float, row_timeout_s: float, env: Dict[str, str], forked: bool = False):
        self.deadline = time.monotonic() + budget_s
        self.budget_s, self.row_timeout_s, self.env, self.forked = budget_s, row_timeout_s, env, forked
        self.rows: List[Row] = []

    def run(self, group: str, name: str, args: List, timeout_s: Optional[float] = None) -> Row:
        row = Row(group, name, [str(a) for a in args])
        self.rows.append(row)
        left = self.deadline - time.monotonic()
        if left < 10:
            row.result = {"error": f"not run: the sweep's budget of {self.budget_s:.0f} s was spent"}
            return row
        limit = min(timeout_s or self.row_timeout_s, left)
        started = time.monotonic()
        try:
            done = (run_forked if self.forked else run_fresh)(row.command, limit, self.env)
        except subprocess.TimeoutExpired:
            row.result = {"error": f"stopped after {limit:.0f} s (its time limit)"}
        else:
            row.result = outcome(done)
        row.result["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps({"row": name, **row.result}), flush=True)
        return row


def run_fresh(command: List[str], timeout_s: float, env: Optional[Dict[str, str]]) -> subprocess.CompletedProcess:
    """`python -m COMMAND` in an interpreter of its own: on the GPU, every row starts as clean as a user's run."""
    return subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=timeout_s, env=env)


def run_forked(command: List[str], timeout_s: float, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """The same command in a child forked from multiprocessing's forkserver, which imported torch and timm once: the
    rehearsal checks every row's command without paying 11 interpreter starts (about 5 s each on the 2-core CPU)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "timm", "cspresnet.engine", "benchmarks.end_to_end"])
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "out", Path(folder) / "err"
        child = context.Process(target=run_module, args=(command, env, out, err))
        child.start()
        child.join(timeout_s)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout_s)
        return subprocess.CompletedProcess(command, child.exitcode, out.read_text(), err.read_text())


def run_module(command: List[str], env: Dict[str, str], out: Path, err: Path) -> None:
    """`python -m COMMAND` inside a forked child, its output into files as run_fresh captures it."""
    os.environ.clear()
    os.environ.update(env)
    with open(out, "w") as stdout, open(err, "w") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        sys.argv = list(command)
        try:
            runpy.run_module(command[0], run_name="__main__", alter_sys=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def outcome(done: subprocess.CompletedProcess) -> Dict:
    """A child's JSON result, or its error: the last line of what it printed to stderr."""
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and lines[-1].startswith("{"):
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"error": f"exit code {done.returncode}: {last[:300]}"}


def model_args(scale: Scale, batch: int, compile_mode: str, *extra) -> List:
    return ["benchmarks.gpu_sweep", "model", "--batch", batch, "--img-size", scale.img_size, "--amp", scale.amp,
            "--compile-mode", compile_mode, "--windows", scale.windows, "--window-steps", scale.window_steps,
            "--warmup", scale.warmup, *extra]


def end_to_end_args(scale: Scale, data: Path, workers: int, overrides: List[str], *extra) -> List:
    size = f"data.img_size={scale.img_size}"
    return ["benchmarks.end_to_end", "--data-dir", data, "--steps", scale.e2e_window_steps, "--windows",
            scale.windows, "--warmup", scale.warmup, *extra, f"batch_size={scale.batches[1]}", size,
            f"data.workers={workers}", f"runtime.amp={scale.amp}", f"model.num_classes={scale.classes}", *overrides]


def compile_overrides(mode: str) -> List[str]:
    return [] if mode == "off" else ["runtime.compile=true", f"runtime.compile_mode={mode}"]


def sweep(runner: Sweep, scale: Scale, data: Path, workers: int) -> None:
    """The rows, most telling first."""
    small, darknet, large = scale.batches
    eager, compiled, graphs = (runner.run("model", f"model-only, {mode}, 1 x {darknet}",
                                          model_args(scale, darknet, mode))
                               for mode in ("off", "default", "reduce-overhead"))
    best = max((eager, compiled, graphs), key=lambda row: row.rate or 0.0)
    mode = best.result.get("compile_mode", "off")

    def e2e(name: str, overrides: List[str], *extra) -> Row:
        return runner.run("end to end", name, end_to_end_args(scale, data, workers, overrides, *extra))

    e2e(f"ours, fast decode, {mode}, 1 x {darknet}", compile_overrides(mode))
    e2e(f"ours, GPU decode (TorchCodec), {mode}, 1 x {darknet}", [*compile_overrides(mode), "data.train_decode=gpu"])
    timm_mode = "default" if mode == "reduce-overhead" else mode  # timm's train.py has no CUDA graphs
    e2e(f"timm's train.py path, {timm_mode}, 1 x {darknet}", compile_overrides(timm_mode), "--pipeline", "timm")
    e2e(f"ours, the darknet recipe as it ships: 4 x {small}, {mode}",
        [*compile_overrides(mode), f"micro_batch_size={small}"])
    runner.run("model", f"model-only, the darknet recipe as it ships: 4 x {small}, {mode}",
               model_args(scale, darknet, mode, "--micro-batch", small))
    e2e(f"ours, fast decode, copy stream, {mode}, 1 x {darknet}",
        [*compile_overrides(mode), "runtime.copy_stream=true"])
    runner.run("model", f"model-only, SGD foreach kernel, off, 1 x {darknet}",
               model_args(scale, darknet, "off", "--kernel", "foreach"))
    runner.run("model", f"evaluation only, {mode}, batch {large}", model_args(scale, large, mode, "--evaluate"))
    for batch in scale.more_batches:
        for each in ("off", "default", "reduce-overhead"):
            runner.run("model", f"model-only, {each}, 1 x {batch}", model_args(scale, batch, each))


# ----------------------------------------------------------------------------- the model-only child

def model_only(batch: int, img_size: int, amp: str, compile_mode: str, micro_batch: int = 0, kernel: str = "fused",
               evaluate: bool = False, windows: int = 5, window_steps: int = 10, warmup: int = 5) -> Dict:
    """train.py's own Updater (fused SGD, the GradScaler, channels_last, the recipe's
    compile) on one uint8 batch already on the device, or evaluation's forward pass."""
    from common.processes import DistContext
    from cspresnet.engine import CompiledAtOneBatch, autocast, build_updater
    from cspresnet.recipe_files import load_recipe
    from data.batches import Batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    recipe = load_recipe("cspresnet50.yaml", [f"batch_size={batch}", f"micro_batch_size={micro_batch}",
                                              f"runtime.amp={amp}", f"optim.kernel={kernel}",
                                              *compile_overrides("off" if evaluate else compile_mode)])
    step = build_updater(recipe, DistContext.alone(device), steps_per_epoch=1_000_000)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, img_size, img_size, 3), dtype=torch.uint8, generator=generator)
    batch_on_device = Batch(images.to(device), torch.randint(0, 1000, (batch,), generator=generator).to(device),
                            torch.arange(batch), [])
    if evaluate:
        model = step.model.eval()
        model = CompiledAtOneBatch(model, batch, compile_mode) if compile_mode != "off" else model
        inputs = step.preprocess(batch_on_device.images)

        def run(number):
            with torch.no_grad(), autocast(device, amp):
                model(inputs)
    else:
        def run(number):
            step(batch_on_device, number)

    started = time.perf_counter()
    for number in range(1, warmup + 1):
        run(number)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    rates = []
    for window in range(windows):
        start = time.perf_counter()
        for number in range(window_steps):
            run(warmup + 1 + window * window_steps + number)
        synchronize(device)
        rates.append(batch * window_steps / (time.perf_counter() - start))
    result = dict(batch=batch, micro_batch=micro_batch, passes=step.passes, img_size=img_size, amp=amp,
                  compile_mode=compile_mode, kernel=kernel, evaluate=evaluate, device=device.type,
                  images_per_s=round(statistics.median(rates), 1), window_rates=[round(r, 1) for r in rates],
                  warmup_s=round(warmup_s, 1))
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the results file

def ratio(a: Row, b: Row) -> str:
    if not (a.rate and b.rate):
        return "n/a (a row did not run or failed)"
    return f"**{a.rate / b.rate:.2f}x**"


def summary(rows: Dict[str, Row], darknet: int, small: int) -> List[str]:
    def find(start: str) -> Optional[Row]:
        return next((row for name, row in rows.items() if name.startswith(start)), None)

    eager, compiled, graphs = (find(f"model-only, {mode}, 1 x {darknet}") for mode in ("off", "default",
                                                                                        "reduce-overhead"))
    best = max((eager, compiled, graphs), key=lambda row: (row.rate or 0.0) if row else 0.0)
    fast, gpu, timm, shipped_e2e, shipped_model, copy = (find(start) for start in (
        "ours, fast decode,", "ours, GPU decode", "timm's train.py", "ours, the darknet recipe",
        "model-only, the darknet recipe", "ours, fast decode, copy stream"))
    lines = [f"- model-only at 1 x {darknet}: compiled / eager {ratio(compiled, eager)}; compiled + CUDA graphs / "
             f"eager {ratio(graphs, eager)}; the best: {best.name if best and best.rate else 'none ran'}"]
    pairs = [("end to end, fast decode / model-only at the same setting", fast, best),
             ("end to end, GPU decode / fast decode", gpu, fast),
             ("end to end, ours / timm's train.py path", fast, timm),
             (f"the darknet recipe as it ships (4 x {small}) / 1 x {darknet}, end to end", shipped_e2e, fast),
             (f"the darknet recipe as it ships (4 x {small}) / 1 x {darknet}, model-only", shipped_model, best),
             ("end to end, copy stream / without", copy, fast)]
    lines += [f"- {text}: {ratio(a, b)}" for text, a, b in pairs if a is not None and b is not None]
    return lines


def render(facts: Dict, sweep: Sweep, scale: Scale, data: Path, command: str, seconds: float) -> str:
    lines = [f"# GPU sweep, {facts['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "date"]
    lines += [f"- data: `{data}` ({scale.classes} classes x {scale.per_class} generated ImageNet-sized JPEGs)",
              f"- command: `{command}`; {seconds:.0f} s in all, budget {sweep.budget_s:.0f} s",
              f"- each figure: images/s, the median of {scale.windows} windows after {scale.warmup} warm-up steps; "
              f"{scale.img_size} px, amp {scale.amp}, channels_last", ""]
    lines += ["## Summary", "", *summary({row.name: row for row in sweep.rows}, scale.batches[1], scale.batches[0]),
              ""]
    for group in dict.fromkeys(row.group for row in sweep.rows):
        lines += [f"## {group}", "", "| row | images/s | windows | warm-up s | peak GiB | wall s | note |",
                  "|---|---|---|---|---|---|---|"]
        for row in (r for r in sweep.rows if r.group == group):
            r = row.result
            note = r.get("error", "")
            if not note and r.get("train_decode") and "GPU decode" in row.name and r["train_decode"] != "gpu":
                note = f"GPU decode unavailable here: ran {r['train_decode']} (see the run's warning)"
            lines.append(f"| {row.name} | {r.get('images_per_s', '')} | {r.get('window_rates', '')} | "
                         f"{r.get('warmup_s', '')} | {r.get('peak_memory_gib', '')} | {r.get('wall_s', '')} | {note} |")
        lines += ["", "Commands:", ""] + [f"    python -m {' '.join(row.command)}" for row in sweep.rows
                                          if row.group == group] + [""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["model"]:
        return model_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearse", action="store_true", help="tiny sizes on the CPU: checks the harness only")
    parser.add_argument("--budget-s", type=float, default=400, help="rows not started by then are listed as not run")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers of the end-to-end rows")
    parser.add_argument("--work-dir", type=Path, default=Path("gpu_sweep"),
                        help="generated JPEGs and the compile cache (kept for a rerun)")
    parser.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/<date>-gpu-sweep.md)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    scale = REHEARSAL if args.rehearse else GPU
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str((args.work_dir / "inductor").resolve()),
               PYTHONUNBUFFERED="1")
    if args.rehearse:
        env["CSPRESNET_BENCH_COMPILE_BACKEND"] = "eager"
    data = generate(args.work_dir / "jpegs", classes=scale.classes, per_class=scale.per_class,
                    val_per_class=max(2, scale.per_class // 10))
    runner = Sweep(args.budget_s - (time.monotonic() - started), scale.row_timeout_s, env, forked=args.rehearse)
    sweep(runner, scale, data, args.workers)
    out = args.out or results_path(RESULTS, "cpu-sweep-rehearsal" if args.rehearse else "gpu-sweep",
                                   datetime.now(timezone.utc))
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.gpu_sweep", *argv])
    out.write_text(render(machine(), runner, scale, data, command, time.monotonic() - started))
    print(out)


def model_child(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sweep model")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="off")
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--kernel", choices=["fused", "foreach", "for-loop"], default="fused")
    parser.add_argument("--evaluate", action="store_true", help="evaluation's forward pass instead of the step")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    rehearsal_compile_backend()
    print_result(model_only(args.batch, args.img_size, args.amp, args.compile_mode, args.micro_batch, args.kernel,
                            args.evaluate, args.windows, args.window_steps, args.warmup))


if __name__ == "__main__":
    main()
