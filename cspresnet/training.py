"""A training run, top to bottom.

    train()
      arrange               processes x passes x images per pass; an impossible cut stops here
      claim_run_folder      rank 0 locks the folder and picks the checkpoint; every rank follows
      read_start_weights    a fresh start from model.initial_weights: the file read and checked
      build                 loaders -> class count -> TrainStep (model, SyncBN, optimizer, schedule,
                            DDP, compile) -> the initial weights, on a fresh start -> RunState
      restore               the checkpoint's weights, optimizer, position and random generators
      start                 rank 0 records the start in the run folder and says what runs
      epochs                the stop watchdog around train_epochs; how the run ends (status)
        train_epochs        for each remaining epoch:
          train_one_epoch     (engine.py) steps to the epoch's end; on a signal: checkpoint, exit 75
          evaluate_epoch      the weights, and their EMA
          save_run            step-<N>.pt, last.pt, best.pt

Every rank must reach these collectives in the same order, or the job hangs until
runtime.collective_timeout_s: the decision in claim_run_folder (all_gather) and the barrier
after loading the checkpoint; DDP's buffer broadcast in every forward pass and its gradient
all-reduce in the last backward pass of every update; with SyncBatchNorm, all-reduces in
every BatchNorm's forward and backward (within its group); every
runtime.log_interval steps the non-finite check (all_reduce MAX) and the stop agreement
(all_reduce); in every save_run two all_gathers (per-rank state, whether it was
written); at each epoch's end the totals (all_reduce), each evaluation (all_gather,
all_reduce) and the unreadable count (all_reduce). Everything that decides whether to call
one of them is the same on every rank (step numbers, agreed flags), never rank-local.
"""
import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from data.loaders import TrainingData, build_training_data
from data.loader_faults import Batches, LoaderStallError, SharedMemoryError
from data.transforms import decode_path
from data.unreadable import UnreadableImages

from .arrangement import Arrangement, arrange
from .checkpoint import TRAIN_CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from .distributed import DistContext, all_gather_objects, all_reduce_sum, barrier
from .engine import (NonFiniteLossError, TrainStep, build_train_step, check_numerics, configure_kernels, evaluate,
                     train_one_epoch)
from .files import unless_disk_full
from .recipe import Recipe, RecipeError, recipe_to_dict, recipe_to_yaml
from .run_folder import RunFolder, RunFolderError
from .run_log import RunLog
from .run_state import EpochTotals, RunState, dataset_fingerprint, seed_everything
from .signals import EXIT_PREEMPTED, StopRequest
from .weights import InitialWeights, apply_initial_weights, read_initial_weights

log = logging.getLogger(__name__)
Resumed = Optional[Tuple[Path, Dict]]  # the checkpoint to continue from, and its contents


class FinalCheckpointError(RuntimeError):
    """The run trained to its end but could not write its final checkpoint (a full disk)."""


def train(recipe: Recipe, ctx: DistContext, output: Path, resume: Optional[str] = None) -> int:
    """Train; returns the process exit code: 0, or EXIT_PREEMPTED after a stop signal."""
    arrangement = arrange(recipe, ctx.world_size)  # an impossible one is refused before anything is touched
    folder = RunFolder(output, recipe.checkpoint.keep_last)
    with folder.released_at_exit():
        resumed = claim_run_folder(folder, resume, ctx)
        with folder.failure_recorded(ctx.is_main):
            recipe = as_it_runs(recipe, ctx)
            recipe, initial = read_start_weights(recipe, resumed)
            configure_kernels(recipe.runtime.deterministic)
            seed_everything(recipe.seed)
            data = build_training_data(recipe.data, recipe.batch_size, recipe.seed, recipe.augment.auto_augment,
                                       ctx.rank, ctx.world_size, ctx.device)
            recipe = with_class_count(recipe, data)
            step = build_train_step(recipe, ctx, data.sampler.steps_per_epoch)
            if initial is not None:
                start_from(initial, step, data)
            run = RunState(EpochTotals(ctx.device), UnreadableImages(
                data.train_set.samples, recipe.data.max_unreadable_batch_fraction,
                recipe.data.max_unreadable_fraction, recipe.data.min_unreadable_allowed),
                datasets=(dataset_fingerprint(data.train_set.samples), dataset_fingerprint(data.val_set.samples)))
            notes = restore(resumed[1], step, run, recipe, ctx, data) if resumed else []
            start(folder, recipe, ctx, data, run, resumed, notes, step.schedule.warmup_steps, arrangement)
            return epochs(recipe, ctx, folder, data, step, run)


def claim_run_folder(folder: RunFolder, resume: Optional[str], ctx: DistContext) -> Resumed:
    """Rank 0 locks the folder and picks the checkpoint to continue from; every rank follows
    its decision, or fails with its error."""
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


def as_it_runs(recipe: Recipe, ctx: DistContext) -> Recipe:
    """The recipe as this machine runs it, which is what the run folder records: GPUs
    without bf16 (before Ampere) train in fp16 instead."""
    if recipe.runtime.amp == "bf16" and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("%s has no bf16: runtime.amp=fp16 instead", torch.cuda.get_device_name(ctx.device))
        return dataclasses.replace(recipe, runtime=dataclasses.replace(recipe.runtime, amp="fp16"))
    return recipe


def with_class_count(recipe: Recipe, data: TrainingData) -> Recipe:
    """model.num_classes: auto becomes the number of class folders in train/ (and the run
    folder records that number); an explicit count must equal it."""
    found = len(data.train_set.classes)
    if recipe.model.num_classes == "auto":
        log.info("model.num_classes: auto -> %d, the class folders of %s", found, Path(recipe.data.dir) / "train")
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, num_classes=found))
    if found != recipe.model.num_classes:
        raise RecipeError(f"recipe key 'model.num_classes' is {recipe.model.num_classes} but {recipe.data.dir}/train "
                          f"has {found} class folders; set model.num_classes={found}, or auto")
    return recipe


def read_start_weights(recipe: Recipe, resumed: Resumed) -> Tuple[Recipe, Optional[InitialWeights]]:
    """On a fresh start from model.initial_weights: the file, read and checked before any
    work, and the recipe with its SHA-256, which the run folder records. A resume takes its
    weights from the checkpoint and reads no other file."""
    model = recipe.model
    if resumed is not None or not model.initial_weights:
        return recipe, None
    initial = read_initial_weights(model.initial_weights, model.initial_weights_kind, model.initial_weights_sha256)
    return dataclasses.replace(recipe, model=dataclasses.replace(model, initial_weights_sha256=initial.sha256)), initial


def start_from(initial: InitialWeights, step: TrainStep, data: TrainingData) -> None:
    """The initial weights into the model and its EMA: the optimizer, schedule and step
    count stay as a new run has them (unlike --resume)."""
    models = [step.model] + ([step.ema.module] if step.ema is not None else [])
    log.info("%s", apply_initial_weights(initial, models, data.train_set.classes))


def restore(state: Dict, step: TrainStep, run: RunState, recipe: Recipe, ctx: DistContext,
            data: TrainingData) -> List[str]:
    """Put the run back where the checkpoint left it; returns why the rest of the run will
    not be exactly what it would have been, if it will not."""
    saved_classes = state["model"]["head.fc.weight"].shape[0]
    if saved_classes != recipe.model.num_classes:
        raise CheckpointError(f"the checkpoint's classifier has {saved_classes} classes but the recipe has "
                              f"model.num_classes={recipe.model.num_classes}: a run cannot change its classes on "
                              f"resume")
    step.model.load_state_dict(state["model"])
    if step.ema is not None:
        if state.get("model_ema") is None:
            raise CheckpointError("this recipe keeps an EMA of the weights but the checkpoint has none; "
                                  "resume with ema.enabled=false or start a new run")
        step.ema.module.load_state_dict(state["model_ema"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.scaler.load_state_dict(state["scaler"])
    notes = [run.load_state_dict(state, ctx.rank, ctx.world_size, recipe.seed)]
    run.saved_step = run.step  # the checkpoint resumed from
    if state["dataset"] != run.datasets[0]:
        notes.append("the training set changed since the checkpoint (files added, removed or renamed), "
                     "so the remaining order of images differs")
    if state.get("eval_dataset", run.datasets[1]) != run.datasets[1]:  # checkpoints before this key: not known
        notes.append("the evaluation set changed since the checkpoint (val/, or the held-out part of train/): "
                     "top-1 before and after this point are not comparable")
    notes.append(continue_with_new_batch(run, state.get("batch_size", recipe.batch_size), recipe.batch_size,
                                         data.sampler.steps_per_epoch))
    changed = diff_recipes(state["recipe"], recipe_to_dict(recipe))
    if changed:
        notes.append("the recipe changed: " + ", ".join(changed))
    return [note for note in notes if note]


def continue_with_new_batch(run: RunState, old_batch: int, new_batch: int, steps_per_epoch: int) -> Optional[str]:
    """A global batch changed in the middle of an epoch: go on after the images already
    trained, rounded down to a whole batch."""
    if old_batch == new_batch or not run.step_in_epoch:
        return None
    images = run.step_in_epoch * old_batch
    run.step_in_epoch = min(images // new_batch, steps_per_epoch)
    goes_on = (f"from its step {run.step_in_epoch + 1} of {steps_per_epoch}"
               if run.step_in_epoch < steps_per_epoch else "with its evaluation")
    return (f"the global batch changed from {old_batch} to {new_batch} in epoch {run.epoch + 1}, after {images} "
            f"of its images; it goes on {goes_on}")


# Keys that change where and how a run goes, not a number it computes (the unreadable-image
# budget decides whether a run stops, not what it trains); and the initial weights, which
# only a fresh start loads (a resume takes the checkpoint's).
NO_EFFECT_ON_RESULTS = {"data.dir", "data.layout", "data.shard_index_dir", "data.workers", "data.loader_timeout_s",
                        "data.max_unreadable_batch_fraction", "data.max_unreadable_fraction",
                        "data.min_unreadable_allowed", "runtime.log_interval", "runtime.stop_timeout_s",
                        "runtime.collective_timeout_s", "checkpoint.every_steps", "checkpoint.keep_last",
                        "model.initial_weights", "model.initial_weights_kind", "model.initial_weights_sha256"}


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


def start(folder: RunFolder, recipe: Recipe, ctx: DistContext, data: TrainingData, run: RunState, resumed: Resumed,
          notes: List[str], warmup_steps: int, arrangement: Arrangement) -> None:
    """Rank 0 records the run's start or resume in its folder and says what it is doing."""
    if not ctx.is_main:
        return
    folder.checkpoints.remove_partial_files()
    if resumed is None:
        unless_disk_full(lambda: (folder.path / "recipe.yaml").write_text(recipe_to_yaml(recipe)), "recipe.yaml")
    if run.epoch < recipe.epochs:
        folder.add_segment(run.step, recipe_to_dict(recipe), ctx.world_size, notes, resumed[0] if resumed else None)
        folder.set_status(f"running from step {run.step}")
    total = recipe.epochs * data.sampler.steps_per_epoch
    log.info("%d process(es) on %s; %d train / %d val images; lr %g (optim.lr %g x %d/%d %s); %d steps; output %s",
             ctx.world_size, ctx.device.type, len(data.train_set), len(data.val_set), recipe.scaled_lr(),
             recipe.optim.lr, recipe.batch_size, recipe.optim.reference_batch_size, recipe.optim.lr_scaling, total,
             folder.path)
    log.log(logging.WARNING if arrangement.short_of_micro_batch else logging.INFO, arrangement.describe())
    if warmup_steps >= total:
        log.warning("the warmup (%d steps) is longer than the run (%d steps); the learning rate never reaches %g",
                    warmup_steps, total, recipe.scaled_lr())
    log.info("training JPEGs: %s; evaluation JPEGs: %s", decode_path(data.train_decode),
             decode_path(recipe.data.eval_decode))
    if resumed is not None:
        log.info("resumed from %s at step %d", resumed[0], run.step)
    for note in notes:
        log.info("resuming inexactly: %s", note)


def epochs(recipe: Recipe, ctx: DistContext, folder: RunFolder, data: TrainingData, step: TrainStep,
           run: RunState) -> int:
    """The epochs from where `run` is to the recipe's last, and how the run ends."""
    run_log = RunLog(folder.path, ctx.is_main, start_step=run.step, rows=run.rows)
    with StopRequest(recipe.runtime.stop_timeout_s, on_give_up=lambda reason: ctx.is_main and folder.set_status(
            f"interrupted at step {run.step}: {reason}")) as stop:
        try:
            if not train_epochs(recipe, ctx, folder, data, step, run, run_log, stop):
                return preempted(folder, ctx, run, stop)
        except (LoaderStallError, SharedMemoryError) as exc:
            raise type(exc)(f"{exc}; {save_after_loader_fault(recipe, ctx, folder, data, step, run)}") from None
    run_log.close()
    if ctx.is_main:
        folder.set_status(f"done at step {run.step}")
    log.info("done: best top-1 %.3f after %d epochs, %d steps; checkpoints in %s", run.best_top1, recipe.epochs,
             run.step, folder.path)
    return 0


def train_epochs(recipe: Recipe, ctx: DistContext, folder: RunFolder, data: TrainingData, step: TrainStep,
                 run: RunState, run_log: RunLog, stop: StopRequest) -> bool:
    """Train, evaluate and save each remaining epoch; False when stopped by a signal."""
    def save(is_best: bool = False) -> bool:
        return save_run(folder, recipe, ctx, data, step, run, is_best)

    if run.epoch < recipe.epochs:
        # One pass over all remaining epochs: the workers decode the next epoch's first
        # batches while this one ends and is evaluated, so the GPU does not wait for them.
        data.sampler.set_epoch(run.epoch, run.step_in_epoch, end_epoch=recipe.epochs)
        batches = iter(Batches(data.train))
    for _ in range(run.epoch, recipe.epochs):
        if not train_one_epoch(step, batches, run, data.sampler.steps_per_epoch, recipe, ctx, stop, run_log, save):
            return False
        if run.saved_step != run.step:
            save()  # the epoch's training, kept whatever becomes of its evaluation (a full /dev/shm, a stall)
        saved = save(is_best=evaluate_epoch(recipe, ctx, data, step, run))
        run_log.epoch(run.rows[-1])
        if not saved and run.epoch == recipe.epochs:
            raise FinalCheckpointError(f"the run trained to its end (step {run.step}) but the disk is full and its "
                                       f"final checkpoint was not written; {redo_advice(folder, run)}")
        if stop.agreed(ctx.device):
            return False
    return True


def evaluate_epoch(recipe: Recipe, ctx: DistContext, data: TrainingData, step: TrainStep, run: RunState) -> bool:
    """Close the epoch: its totals, the evaluation of the weights (and of their EMA), its
    summary row; whether it is the best epoch yet (on the better of the two)."""
    check_numerics(run, recipe.runtime.max_nonfinite_steps)
    stats = run.totals.finish_epoch(run.epoch_seconds)
    result = evaluate(step.model, data.val, recipe.model.num_classes, step.preprocess, step.amp)
    position = (run.epoch + 1) * data.sampler.steps_per_epoch  # the schedule's, see RunState.schedule_position
    row = dict(epoch=run.epoch + 1, step=run.step, lr=step.schedule(position), train_loss=stats.loss,
               eval_loss=result.loss, top1=result.top1, top5=result.top5)
    score = result.top1
    if step.ema is not None:
        ema_result = evaluate(step.ema.module, data.val, recipe.model.num_classes, step.preprocess, step.amp)
        row.update(ema_eval_loss=ema_result.loss, ema_top1=ema_result.top1, ema_top5=ema_result.top5)
        score = max(score, ema_result.top1)
    is_best = score > run.best_top1
    run.best_top1 = max(run.best_top1, score)
    unreadable = all_reduce_sum(torch.tensor([float(run.unreadable.epoch_count)], device=ctx.device))
    run.unreadable.epoch_count = 0
    row.update(images_per_s=stats.images_per_s, epoch_seconds=stats.seconds, eval_seconds=result.seconds,
               nonfinite_steps=stats.nonfinite_steps, unreadable_images=int(unreadable.item()))
    run.rows.append(row)
    run.epoch, run.step_in_epoch, run.epoch_seconds = run.epoch + 1, 0, 0.0
    return is_best


def save_run(folder: RunFolder, recipe: Recipe, ctx: DistContext, data: TrainingData, step: TrainStep,
                    run: RunState, is_best: bool = False) -> bool:
    """All ranks: gather the per-rank state; rank 0 writes. False when the disk was full.
    Never writes non-finite weights."""
    per_rank = all_gather_objects(run.rank_state_dict())
    if not step.weights_are_finite():
        raise NonFiniteLossError(f"the weights are not finite at step {run.step}; "
                                 f"refusing to overwrite the last good checkpoint")
    written = True
    if ctx.is_main:
        state = dict(format=TRAIN_CHECKPOINT_FORMAT, model=step.model.state_dict(),
                     optimizer=step.optimizer.state_dict(), scaler=step.scaler.state_dict(),
                     model_ema=step.ema.module.state_dict() if step.ema else None, **run.state_dict(per_rank),
                     dataset=run.datasets[0], eval_dataset=run.datasets[1], batch_size=recipe.batch_size,
                     classes=data.train_set.classes, recipe=recipe_to_dict(recipe),
                     metrics=run.rows[-1] if run.rows else None)
        written = folder.checkpoints.save(state, run.step, is_best) is not None
    written = all_gather_objects(written)[0]  # also keeps the other ranks from racing ahead of the write
    if written:
        run.saved_step = run.step
    return written


def redo_advice(folder: RunFolder, run: RunState) -> str:
    """What to run after the checkpoint of run.step could not be written, and what it will redo."""
    if run.saved_step < 0:
        return (f"no checkpoint of this run was written; free space in {folder.path}, then rerun with --resume auto "
                f"(it starts again from step 0)")
    return (f"the newest checkpoint is of step {run.saved_step}; free space in {folder.path}, then rerun with "
            f"--resume auto to redo the steps since")


def save_after_loader_fault(recipe: Recipe, ctx: DistContext, folder: RunFolder, data: TrainingData,
                            step: TrainStep, run: RunState) -> str:
    """After the loader failed to deliver: one process saves where it got to (its state is
    whole, between two steps); several cannot, since the others wait in a collective that
    this rank will not join. Returns what was saved, in words."""
    if run.saved_step == run.step:
        return f"checkpoint saved at step {run.step}; continue with --resume auto"
    if not ctx.is_distributed and save_run(folder, recipe, ctx, data, step, run):
        return f"checkpoint saved at step {run.step}; continue with --resume auto"
    if run.saved_step < 0:
        return "no checkpoint of this run was written; rerun with --resume auto (it starts again from step 0)"
    return f"the newest checkpoint is of step {run.saved_step}; continue from it with --resume auto"


def preempted(folder: RunFolder, ctx: DistContext, run: RunState, stop: StopRequest) -> int:
    """The stop's outcome, as it is on disk: the newest checkpoint that was written."""
    signal_name = stop.signal_name or "a signal to another rank"
    if run.saved_step == run.step:
        log.info("stopping on %s: checkpoint saved at step %d; continue with --resume auto", signal_name, run.step)
    else:
        log.warning("stopping on %s: the checkpoint of step %d could not be written (the disk is full); %s",
                    signal_name, run.step, redo_advice(folder, run))
    if ctx.is_main:
        folder.set_status(f"preempted at step {max(run.saved_step, 0)}")
    return EXIT_PREEMPTED
