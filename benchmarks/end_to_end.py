"""End-to-end training throughput with real JPEGs: loader, transfer, model step, as
train.py runs them (ours), or as timm's train.py runs them (timm.data.create_loader with
its CUDA prefetcher, timm's cspresnet50), with the same optimizer, batch, precision and
memory format. On a GPU it also reports peak memory and achieved TFLOP/s.

    python -m benchmarks.end_to_end --data-dir DIR --pipeline ours --steps 50 batch_size=128 data.workers=16
"""
import argparse
import collections
import itertools
import statistics
import time
from pathlib import Path
from typing import Optional

import timm
import torch

from benchmarks.common import print_result, rehearsal_compile_backend
from common.processes import DistContext
from cspresnet.engine import autocast, build_criterion, build_updater, configure_kernels
from cspresnet.optim import build_optimizer
from cspresnet.recipe_files import load_recipe
from data.batches import Batch
from data.device_feed import ahead_on_device
from data.loaders import build_training_data
from data.transforms import memory_format

FLOP_PER_TRAINING_IMAGE = 27e9  # 3 x 2 x 4.5 GMAC at 256 px (timm: cspresnet50, 4.5 GMACs at 256 px)


def bf16_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The GPU's measured dense bf16 matmul rate, the ceiling to compare against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def waited(batches, waits: list):
    """The batches, adding to `waits` the seconds the training loop spent waiting for each:
    how long the GPU waits on the loader, as against on the training process itself."""
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        waits.append(time.perf_counter() - start)
        yield batch


def ours(recipe, device: torch.device, waits: list, use_loader: bool = True, sleep_step: float = 0.0,
         pass_per_epoch: bool = False, facts: Optional[dict] = None):
    """An endless iterator of training steps, train.py's way; yields (images, epoch) per step.
    Without the loader, the same step runs on one real batch over and over (pinned on a
    GPU, as the loader hands it over): what the step costs when data is free. With
    `sleep_step`, a sleep stands in for the step: a device of that speed that needs no CPU.
    With `pass_per_epoch`, a new pass of the loader starts each epoch, and its workers
    start from an empty queue. `facts` gets the decode that runs (GPU decode may fall back)."""
    data = build_training_data(recipe.data, recipe.batch_size, recipe.seed, DistContext.alone(device))
    if facts is not None:
        facts["train_decode"] = data.train_decode
    train_step = build_updater(recipe, DistContext.alone(device),
                                  data.sampler.steps_per_epoch)
    step_number = itertools.count(1)
    step = (lambda batch: time.sleep(sleep_step)) if sleep_step else \
        (lambda batch: train_step(batch, next(step_number)))
    if not use_loader:
        first = next(iter(data.train))
        batch = Batch(first.images.clone(), first.targets, first.indices, first.unreadable)  # off the workers' ring
        batches = itertools.repeat((batch.pin_memory() if device.type == "cuda" else batch, 0))
    elif pass_per_epoch:
        batches = passes_per_epoch(data.sampler, data.train)
    else:  # as train.py makes it: one pass through the epochs
        data.sampler.set_epoch(0, end_epoch=1_000_000)
        batches = ((batch, i // data.sampler.steps_per_epoch) for i, batch in enumerate(data.train))
    if recipe.runtime.copy_stream and use_loader:  # as train.py: the copy of the next batch overlaps this step
        batches = ahead_with_epochs(batches, device)
    for batch, epoch in waited(batches, waits):
        step(batch)
        yield len(batch.targets), epoch


def ahead_with_epochs(batches, device: torch.device):
    """(batch, epoch) pairs through the copy stream's look-ahead, each batch with its epoch."""
    epochs = collections.deque()

    def only_batches():
        for batch, epoch in batches:
            epochs.append(epoch)
            yield batch

    return ((batch, epochs.popleft()) for batch in ahead_on_device(only_batches(), device))


def passes_per_epoch(sampler, loader):
    """(batch, epoch), a new pass of the loader each epoch: what timm's train.py makes."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for batch in loader:
            yield batch, epoch


def timms(recipe, device: torch.device, waits: list):
    """timm's train.py path: create_loader with its prefetcher (uint8 to the GPU, normalised
    there), its model, our optimizer (the same SGD)."""
    rt = recipe.runtime
    dataset = timm.data.ImageDataset(str(Path(recipe.data.dir) / "train"))
    loader = timm.data.create_loader(
        dataset, input_size=(3, recipe.data.img_size, recipe.data.img_size), batch_size=recipe.batch_size,
        is_training=True, color_jitter=None, interpolation=recipe.data.train_interpolation,
        num_workers=recipe.data.workers, device=device, use_prefetcher=device.type == "cuda", persistent_workers=True)
    layout = memory_format(rt.channels_last)
    model = timm.create_model("cspresnet50", num_classes=recipe.model.num_classes).to(device, memory_format=layout)
    train_model = torch.compile(model, mode=rt.compile_mode) if rt.compile else model
    optimizer = build_optimizer(model, recipe)
    criterion = build_criterion(False, recipe.label_smoothing)
    for epoch in itertools.count():
        for inputs, targets in waited(loader, waits):
            inputs = inputs.to(device, non_blocking=True).contiguous(memory_format=layout)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, rt.amp):
                loss = criterion(train_model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield len(targets), epoch


def measure(data_dir: str, pipeline: str = "ours", steps: int = 20, warmup: int = 5, overrides=(),
            recipe_name: str = "cspresnet50.yaml", use_loader: bool = True, sleep_step: float = 0.0,
            pass_per_epoch: bool = False, windows: int = 1) -> dict:
    """images/s over `windows` timed windows of `steps` steps each, after `warmup` steps: the
    median window's rate, and each window's."""
    # One pass per step, as timm's side runs (and as the results before micro-batches were
    # measured), unless an override given here says otherwise.
    one_pass = [] if any(o.startswith("micro_batch_size=") for o in overrides) else ["micro_batch_size=0"]
    recipe = load_recipe(recipe_name, [*one_pass, *overrides], data_dir=str(data_dir))
    device = torch.device("cuda" if torch.cuda.is_available() and recipe.runtime.device != "cpu" else "cpu")
    configure_kernels(recipe.runtime.deterministic)
    waits, facts = [], {"train_decode": "pillow"}
    if pipeline == "ours":
        steps_iter = ours(recipe, device, waits, use_loader, sleep_step, pass_per_epoch, facts)
    else:
        steps_iter = timms(recipe, device, waits)
    first_epoch = 0
    for _ in range(warmup):
        _, first_epoch = next(steps_iter)
    waits.clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rates, seconds, images, epoch = [], 0.0, 0, first_epoch
    for _ in range(windows):
        start, window_images = time.perf_counter(), 0
        for _ in range(steps):
            step_images, epoch = next(steps_iter)
            window_images += step_images
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(window_images / (time.perf_counter() - start))
        seconds, images = seconds + time.perf_counter() - start, images + window_images
    if not use_loader:
        loader_passes = "none"
    elif pipeline == "timm" or pass_per_epoch:
        loader_passes = "pass per epoch"
    else:
        loader_passes = "one pass"
    result = {"pipeline": pipeline, "recipe": recipe_name, "device": device.type, "batch_size": recipe.batch_size,
              "img_size": recipe.data.img_size, "workers": recipe.data.workers, "amp": recipe.runtime.amp,
              "channels_last": recipe.runtime.channels_last, "compile": recipe.runtime.compile,
              "compile_mode": recipe.runtime.compile_mode, "copy_stream": recipe.runtime.copy_stream,
              "micro_batch_size": recipe.micro_batch_size, "deterministic": recipe.runtime.deterministic,
              "train_decode": facts["train_decode"], "steps": steps * windows,
              "images_per_s": round(statistics.median(rates), 1),
              "loader": loader_passes,
              "sleep_step": sleep_step, "data_wait_fraction": round(sum(waits) / seconds, 3),
              # the loader refills at an epoch's start, and the GPU may wait then: a timed
              # window that crosses epoch ends measures more than the steady state
              "epoch_ends": epoch - first_epoch}
    if windows > 1:
        result["window_rates"] = [round(rate, 1) for rate in rates]
    if device.type == "cuda":
        achieved = images / seconds * FLOP_PER_TRAINING_IMAGE / 1e12
        peak = bf16_peak_tflops(device)
        result.update(peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      achieved_tflops=round(achieved, 1), bf16_peak_tflops=round(peak, 1),
                      fraction_of_peak=round(achieved / peak, 3))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--pipeline", choices=["ours", "timm"], default="ours")
    parser.add_argument("--recipe", default="cspresnet50.yaml",
                        help="ours: the recipe whose whole step is timed (augmentation, mixup, EMA included); "
                             "timm's path always runs the darknet recipe's augmentation")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--windows", type=int, default=1, help="timed windows of --steps steps; the median's rate")
    parser.add_argument("--no-loader", action="store_true",
                        help="ours: train on one real batch over and over, to time the step without the loader")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for cspresnet50.yaml, e.g. batch_size=256")
    parser.add_argument("--sleep-step", type=float, default=0.0, metavar="SECONDS",
                        help="ours: sleep this long instead of each training step, a stand-in for a device "
                             "that needs no CPU: can the loader on this machine feed a device that fast?")
    parser.add_argument("--pass-per-epoch", action="store_true",
                        help="ours: a new loader pass each epoch (as timm's train.py makes), not one for the run")
    args = parser.parse_intermixed_args()
    rehearsal_compile_backend()
    if (args.no_loader or args.sleep_step or args.pass_per_epoch) and args.pipeline != "ours":
        parser.error("--no-loader, --sleep-step and --pass-per-epoch apply to our pipeline, not to --pipeline timm")
    print_result(measure(args.data_dir, args.pipeline, args.steps, args.warmup, args.overrides, args.recipe,
                         use_loader=not args.no_loader, sleep_step=args.sleep_step, pass_per_epoch=args.pass_per_epoch,
                         windows=args.windows))


if __name__ == "__main__":
    main()
