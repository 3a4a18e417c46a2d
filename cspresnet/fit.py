"""A training run: build everything from the recipe, resume if asked, then the epoch loop
with its checkpoints, logs and stop conditions."""
import dataclasses
import itertools
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.loader import UnreadableImages
from data.pipeline import build_loaders
from data.transforms import DeviceNormalizer, build_batch_augment

from .checkpoint import TRAIN_CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, unless_disk_full
from .distributed import DistContext, all_gather_objects, all_reduce_sum, barrier
from .engine import (NonFiniteLossError, Trainer, build_criterion, build_grad_scaler, configure_kernels,
                     evaluate)
from .model import build_model
from .optim import build_optimizer, build_schedule
from .recipe import Recipe, recipe_to_dict, recipe_to_yaml
from .run_log import RunLog
from .run_folder import RunFolder, RunFolderError
from .run_state import capture_rng, dataset_fingerprint, restore_rng
from .signals import EXIT_PREEMPTED, StopRequest


class FinalCheckpointError(RuntimeError):
    """The run trained to its end but could not write its final checkpoint (a full disk)."""


@dataclass
class Progress:
    """Where the run is, in plain data (it goes into every checkpoint)."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the current epoch completed
    epoch_seconds: float = 0.0  # training time spent in the current epoch so far
    best_top1: float = float("-inf")
    rows: List[Dict] = field(default_factory=list)  # summary.csv, one row per completed epoch


def build_trainer(recipe: Recipe, model: torch.nn.Module, device: torch.device, amp: str,
                  steps_per_epoch: int) -> Trainer:
    """Everything the recipe's training step needs around `model` (moved to `device`)."""
    rt = recipe.runtime
    model = model.to(device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    return Trainer(
        model=model, train_model=model, optimizer=build_optimizer(model, recipe), scaler=build_grad_scaler(device, amp),
        schedule=build_schedule(recipe, steps_per_epoch),
        criterion=build_criterion(recipe.mixing(), recipe.label_smoothing),
        normalize=DeviceNormalizer(device, rt.channels_last), amp=amp,
        augment=build_batch_augment(recipe.augment, recipe.label_smoothing, recipe.model.num_classes, device),
        ema=ModelEmaV3(model, decay=recipe.ema.decay) if recipe.ema.enabled else None,
    )


def claim_run_folder(folder: RunFolder, resume: Optional[str], ctx: DistContext):
    """Rank 0 locks the folder and picks the checkpoint to continue from, (path, state), or
    None; every rank follows its decision, or fails with its error."""
    decision, state = ("start",), None
    if ctx.is_main:
        try:
            folder.lock()
            found = folder.choose_start(resume)
            if found is not None:
                decision, state = ("resume", str(found[0])), found[1]
        except (RunFolderError, CheckpointError) as exc:
            decision = ("error", str(exc))
    decision = all_gather_objects(decision)[0]
    if decision[0] == "error":
        raise RunFolderError(decision[1])
    if decision[0] == "start":
        return None
    if not ctx.is_main:
        state = load_checkpoint(Path(decision[1]))
    barrier()  # every rank has read the checkpoint before rank 0 may replace it
    return Path(decision[1]), state


def fit(recipe: Recipe, ctx: DistContext, output: Path, resume: Optional[str] = None) -> int:
    """Train; returns the process exit code (0, or EXIT_PREEMPTED after a stop signal)."""
    folder = RunFolder(output, recipe.checkpoint.keep_last)
    resumed = claim_run_folder(folder, resume, ctx)
    try:
        return train(recipe, ctx, folder, resumed)
    except BaseException as exc:
        if ctx.is_main:
            last_line = (str(exc).strip().splitlines() or ["no message"])[-1]
            try:
                folder.set_status(f"failed: {type(exc).__name__}: {last_line}")
            except OSError as status_error:  # e.g. the folder turned read-only: the first error is the one to tell
                print(f"warning: status not written: {status_error}", file=sys.stderr, flush=True)
        raise


def train(recipe: Recipe, ctx: DistContext, folder: RunFolder, resumed) -> int:
    rt = recipe.runtime
    output = folder.path
    if rt.amp == "bf16" and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if ctx.is_main:
            print(f"warning: {torch.cuda.get_device_name(ctx.device)} has no bf16: runtime.amp=fp16 instead", flush=True)
        rt = dataclasses.replace(rt, amp="fp16")

    configure_kernels(rt.deterministic)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    data = build_loaders(recipe, ctx.rank, ctx.world_size, ctx.device)
    model = build_model(recipe.model.num_classes, recipe.model.drop_rate, recipe.model.drop_path_rate)
    trainer = build_trainer(recipe, model, ctx.device, rt.amp, data.train_sampler.steps_per_epoch)
    model, optimizer = trainer.model, trainer.optimizer
    unreadable = UnreadableImages(data.train_set, recipe.data.max_unreadable_batch_fraction,
                                  recipe.data.max_unreadable_fraction, recipe.data.min_unreadable_allowed)
    fingerprint = dataset_fingerprint(data.train_set.samples)
    progress, notes = Progress(), []
    if resumed is not None:
        progress, notes = restore(resumed[1], trainer, unreadable, ctx, recipe, fingerprint,
                                  data.train_sampler.steps_per_epoch)

    if ctx.is_distributed:
        trainer.train_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    if rt.compile:
        trainer.train_model = torch.compile(trainer.train_model)

    start_step = trainer.step
    log = RunLog(output, ctx.is_main, start_step=start_step, rows=progress.rows)
    if ctx.is_main:
        folder.checkpoints.remove_partial_files()
        if resumed is None:
            unless_disk_full(lambda: (output / "recipe.yaml").write_text(recipe_to_yaml(recipe)), "recipe.yaml")
        if progress.epoch < recipe.epochs:
            folder.add_segment(start_step, recipe_to_dict(recipe), ctx.world_size, notes,
                               resumed[0] if resumed else None)
            folder.set_status(f"running from step {start_step}")
        announce(recipe, ctx, data, trainer, output, resumed, notes)

    def save(is_best: bool = False) -> bool:
        """All ranks: gather per-rank state; rank 0 writes (False: the disk was full).
        Never writes non-finite weights."""
        per_rank = all_gather_objects(dict(rng=capture_rng(ctx.device), totals=trainer.totals.state_dict(),
                                           unreadable=unreadable.state_dict()))
        if not trainer.weights_are_finite():
            raise NonFiniteLossError(f"the weights are not finite at step {trainer.step}; "
                                     f"refusing to overwrite the last good checkpoint")
        written = True
        if ctx.is_main:
            state = dict(format=TRAIN_CHECKPOINT_FORMAT, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         model_ema=trainer.ema.module.state_dict() if trainer.ema else None,
                         scaler=trainer.scaler.state_dict(), step=trainer.step, **asdict(progress),
                         per_rank=per_rank, world_size=ctx.world_size, dataset=fingerprint,
                         batch_size=recipe.batch_size, classes=data.train_set.classes,
                         recipe=recipe_to_dict(recipe), metrics=progress.rows[-1] if progress.rows else None)
            written = folder.checkpoints.save(state, trainer.step, is_best) is not None
        return all_gather_objects(written)[0]  # also keeps the other ranks from racing ahead of the write

    def evaluate_weights(weights: torch.nn.Module):
        return evaluate(weights, data.val, len(data.val_set), recipe.model.num_classes, trainer.normalize, rt.amp,
                        on_unreadable=lambda index, reason: print(
                            f"warning: skipping unreadable validation image {data.val_set.samples[index][0]} ({reason})",
                            file=sys.stderr))

    stop = StopRequest(rt.stop_timeout_s, on_give_up=lambda reason: ctx.is_main and folder.set_status(
        f"interrupted at step {trainer.step}: {reason}"))
    steps_per_epoch = data.train_sampler.steps_per_epoch
    every = recipe.checkpoint.every_steps
    if progress.epoch < recipe.epochs:
        # One pass over all remaining epochs: the workers decode the next epoch's first
        # batches while this one ends and is evaluated, so the GPU does not wait for them.
        data.train_sampler.set_epoch(progress.epoch, progress.step_in_epoch, end_epoch=recipe.epochs)
        batches = iter(data.train)
    for epoch in range(progress.epoch, recipe.epochs):
        model.train()
        started = time.perf_counter() - progress.epoch_seconds
        bar = tqdm(itertools.islice(batches, steps_per_epoch - progress.step_in_epoch),
                   desc=f"epoch {epoch + 1}/{recipe.epochs}", initial=progress.step_in_epoch, total=steps_per_epoch,
                   disable=None if ctx.is_main else True, leave=False, dynamic_ncols=True)
        for batch in bar:
            unreadable.check(batch)
            trainer.train_step(batch)
            progress.step_in_epoch += 1
            stopping = False
            if trainer.step % rt.log_interval == 0:
                log.step(trainer.step, trainer.read_window_loss(), trainer.lr)
                trainer.check_numerics(rt.max_nonfinite_steps)
                stopping = stop.agreed(ctx.device)
            elif not ctx.is_distributed:
                stopping = stop.signal_name is not None  # one process: no need to agree, stop at once
            mid_epoch = progress.step_in_epoch < steps_per_epoch
            if stopping or (every and trainer.step % every == 0 and mid_epoch):
                trainer.check_numerics(rt.max_nonfinite_steps)
                progress.epoch_seconds = time.perf_counter() - started
                save()
            if stopping:
                if ctx.is_main:
                    folder.set_status(f"preempted at step {trainer.step}")
                    print(f"stopping on {stop.signal_name or 'a signal to another rank'}: checkpoint saved at "
                          f"step {trainer.step}; continue with --resume auto", flush=True)
                return EXIT_PREEMPTED
        bar.close()

        stats = trainer.finish_epoch(time.perf_counter() - started)
        trainer.check_numerics(rt.max_nonfinite_steps)

        result = evaluate_weights(model)
        row = dict(epoch=epoch + 1, step=trainer.step, lr=trainer.lr, train_loss=stats.loss, eval_loss=result.loss,
                   top1=result.top1, top5=result.top5)
        score = result.top1
        if trainer.ema is not None:  # best.pt is chosen on the better of the two
            ema_result = evaluate_weights(trainer.ema.module)
            row.update(ema_eval_loss=ema_result.loss, ema_top1=ema_result.top1, ema_top5=ema_result.top5)
            score = max(score, ema_result.top1)
        is_best = score > progress.best_top1
        progress.best_top1 = max(progress.best_top1, score)
        unreadable_count = int(all_reduce_sum(torch.tensor([float(unreadable.epoch_count)], device=ctx.device)).item())
        unreadable.epoch_count = 0
        row.update(images_per_s=stats.images_per_s, epoch_seconds=stats.seconds, eval_seconds=result.seconds,
                   nonfinite_steps=stats.nonfinite_steps, unreadable_images=unreadable_count)
        progress.rows.append(row)
        progress.epoch, progress.step_in_epoch, progress.epoch_seconds = epoch + 1, 0, 0.0
        saved = save(is_best)
        log.epoch(progress.rows[-1])
        if not saved and progress.epoch == recipe.epochs:
            raise FinalCheckpointError(f"the run trained to its end (step {trainer.step}) but the disk is full and its final "
                                  f"checkpoint was not written; free space in {output} and rerun with --resume auto "
                                  f"to redo the steps since its last checkpoint")
        if stop.agreed(ctx.device):
            if ctx.is_main:
                folder.set_status(f"preempted at step {trainer.step}")
                print(f"stopping on a signal after epoch {epoch + 1}; continue with --resume auto", flush=True)
            return EXIT_PREEMPTED

    log.close()
    if ctx.is_main:
        folder.set_status(f"done at step {trainer.step}")
        print(f"done: best top-1 {progress.best_top1:.3f} after {recipe.epochs} epochs, {trainer.step} steps; "
              f"checkpoints in {output}", flush=True)
    return 0


def restore(state: Dict, trainer: Trainer, unreadable: UnreadableImages, ctx: DistContext, recipe: Recipe,
            fingerprint: str, steps_per_epoch: int) -> Tuple[Progress, List[str]]:
    """Put the run back where the checkpoint left it, down to every rank's random generators;
    also the reasons why the rest of the run will not be exactly what it would have been."""
    check_same_classes(state, recipe.model.num_classes)
    trainer.model.load_state_dict(state["model"])
    if trainer.ema is not None:
        if state.get("model_ema") is None:
            raise CheckpointError("this recipe keeps an EMA of the weights but the checkpoint has none; "
                                  "resume with ema.enabled=false or start a new run")
        trainer.ema.module.load_state_dict(state["model_ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step = state["step"]
    progress = Progress(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                        epoch_seconds=state["epoch_seconds"], best_top1=state["best_top1"], rows=state["rows"])
    notes = []
    if state["dataset"] != fingerprint:
        notes.append("the training set changed since the checkpoint (files added, removed or renamed), "
                     "so the remaining order of images differs")
    old_batch = state.get("batch_size", recipe.batch_size)
    if old_batch != recipe.batch_size and progress.step_in_epoch:
        images = progress.step_in_epoch * old_batch
        progress.step_in_epoch = min(images // recipe.batch_size, steps_per_epoch)
        goes_on = (f"from its step {progress.step_in_epoch + 1} of {steps_per_epoch}"
                   if progress.step_in_epoch < steps_per_epoch else "with its evaluation")
        notes.append(f"the global batch changed from {old_batch} to {recipe.batch_size} in epoch {progress.epoch + 1}, "
                     f"after {images} of its images; it goes on {goes_on}")
    if state["world_size"] == ctx.world_size:
        mine = state["per_rank"][ctx.rank]
        restore_rng(mine["rng"], ctx.device)
        trainer.totals.load_state_dict(mine["totals"])
        unreadable.load_state_dict(mine["unreadable"])
    else:
        notes.append(f"it was saved by {state['world_size']} processes, this run has {ctx.world_size}: "
                     f"new random draws for dropout and mixup")
        torch.manual_seed(recipe.seed + 1_000_003 * ctx.rank + trainer.step)
        if ctx.is_main:  # the epoch's totals so far, summed over the old ranks
            merged = trainer.totals
            for rank_state in state["per_rank"]:
                for key in ("sums", "window"):
                    getattr(merged, key).add_(rank_state["totals"][key].to(merged.device))
                merged.images += rank_state["totals"]["images"]
    changed = diff_recipes(state["recipe"], recipe_to_dict(recipe))
    if changed:
        notes.append("the recipe changed: " + ", ".join(changed))
    return progress, notes


def check_same_classes(state: Dict, num_classes: int) -> None:
    saved = state["model"]["head.fc.weight"].shape[0]
    if saved != num_classes:
        raise CheckpointError(f"the checkpoint's classifier has {saved} classes but the recipe has "
                              f"model.num_classes={num_classes}: a run cannot change its classes on resume")


# Keys that change where and how a run goes, not a number it computes.
NO_EFFECT_ON_RESULTS = {"data.dir", "data.workers", "runtime.log_interval", "runtime.stop_timeout_s",
                        "runtime.collective_timeout_s", "checkpoint.every_steps", "checkpoint.keep_last"}


def diff_recipes(old: Dict, new: Dict, prefix: str = "") -> List[str]:
    """The changed keys that can change the trained weights."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff_recipes(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in NO_EFFECT_ON_RESULTS:
            changes.append(f"{prefix}{key} {a!r} -> {b!r}")
    return changes


def announce(recipe: Recipe, ctx: DistContext, data, trainer: Trainer, output: Path, resumed, notes: List[str]) -> None:
    total = recipe.epochs * data.train_sampler.steps_per_epoch
    print(f"{ctx.world_size} process(es) on {ctx.device.type}; {len(data.train_set)} train / "
          f"{len(data.val_set)} val images; global batch {recipe.batch_size}; lr {recipe.scaled_lr():g} "
          f"(optim.lr {recipe.optim.lr:g} x {recipe.batch_size}/{recipe.optim.reference_batch_size} "
          f"{recipe.optim.lr_scaling}); {total} steps; output {output}", flush=True)
    if trainer.schedule.warmup_steps >= total:
        print(f"warning: the warmup ({trainer.schedule.warmup_steps} steps) is longer than the run ({total} steps); "
              f"the learning rate never reaches {recipe.scaled_lr():g}", flush=True)
    if resumed is not None:
        print(f"resumed from {resumed[0]} at step {trainer.step}", flush=True)
    for note in notes:
        print(f"warning: resuming inexactly: {note}", flush=True)
