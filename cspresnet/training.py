"""A training run: train() claims the run folder, TrainingRun builds the data and the step, restores the
checkpoint and trains. This module alone knows the run folder, the log and the stop protocol. Every rank
must reach the same collectives in the same order, or the job hangs (the list: docs/training.md, "Every
failure ends every process"): whatever decides whether to call one is the same on every rank."""
import contextlib
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from common.errors import (
    CheckpointError,
    FinalCheckpointError,
    LoaderStallError,
    NonFiniteLossError,
    RecipeError,
    RunFolderError,
    SharedMemoryError,
    SourceChangedError,
)
from common.processes import DistContext
from data.device_feed import ahead_on_device, decoded_on
from data.loader_faults import Batches
from data.loaders import TrainingData, build_training_data

from .arrangement import Arrangement, arrange, on_another_count
from .checkpoint import TrainingCheckpoint, read_training_checkpoint
from .distributed import all_gather_objects, all_reduce_sum, barrier
from .engine import build_updater, configure_kernels, evaluate, evaluated_models
from .recipe import Recipe, changed_keys, recipe_to_dict, recipe_to_yaml
from .run_folder import RunFolder
from .run_log import RunLog, StepPosition
from .run_state import EpochTotals, RunState
from .signals import EXIT_PREEMPTED, StartInterrupted, StopRequest
from .weights import InitialWeights, apply_initial_weights, read_initial_weights

log = logging.getLogger(__name__)
Resumed = Optional[Tuple[Path, TrainingCheckpoint]]  # the checkpoint to continue from, and what it holds


def train(recipe: Recipe, ctx: DistContext, output: Path, resume: Optional[str] = None,
          early_signals: Optional[List[int]] = None) -> int:
    """Returns the exit code: 0, or EXIT_PREEMPTED after a stop signal (also during the start, with nothing
    to save). `early_signals`: stop signals train.py recorded while Python imported."""
    arrangement = arrange(recipe, ctx.world_size)  # an impossible one is refused before anything is touched
    folder = RunFolder(output, recipe.checkpoint.keep_last)
    with contextlib.closing(folder), StopRequest(recipe.runtime.stop_timeout_s, early_signals=early_signals) as stop:
        resumed = folder.resumed = claim_run_folder(folder, resume, ctx)
        step = resumed[1].position.step if resumed else 0  # the newest checkpoint's: where the run stands for now
        stop.on_give_up = lambda reason: ctx.is_main and folder.set_status(f"interrupted at step {step}: {reason}")
        with folder.failure_recorded(ctx.is_main):
            try:
                stop.arm_start()
                return TrainingRun(recipe, ctx, arrangement, folder, stop).train()
            except StartInterrupted as exc:  # only before the run trains: TrainingRun's stop.training() ends it
                log.info("stopping on %s during the start, before any training: %s; continue with --resume auto", exc,
                         f"the newest checkpoint is still of step {step}" if resumed else
                         "nothing of this run was trained yet")
                if ctx.is_main:
                    folder.set_status(f"preempted at step {step}")
                return EXIT_PREEMPTED


class TrainingRun:
    def __init__(self, recipe: Recipe, ctx: DistContext, arrangement: Arrangement, folder: RunFolder,
                 stop: StopRequest):
        resumed = folder.resumed
        recipe, initial = read_start_weights(as_it_runs(recipe, ctx), resumed)
        configure_kernels(recipe.runtime.deterministic, recipe.seed)
        self.data: TrainingData = build_training_data(recipe.data, recipe.batch_size, recipe.seed, ctx)
        self.recipe = recipe = with_class_count(recipe, self.data)
        self.ctx, self.folder, self.arrangement = ctx, folder, arrangement
        self.steps_per_epoch = self.data.sampler.steps_per_epoch
        self.updater = build_updater(recipe, ctx, self.steps_per_epoch, self.arrangement, seed=recipe.seed)
        self.eval_models = evaluated_models(self.updater, recipe.runtime, self.data.val.batch_size)
        if initial is not None:
            models = [self.updater.model] + ([self.updater.ema.module] if self.updater.ema is not None else [])
            log.info("%s", apply_initial_weights(initial, models, self.data.train_set.classes))
        self.state = RunState(totals=EpochTotals(ctx.device), unreadable=self.data.unreadable)
        notes = self.restore(resumed[1]) if resumed else []
        self.stop = stop
        stop.training()  # before the run folder's files are written: a stop now waits for a step's end and a save
        self.announce(notes)
        self.log = RunLog(folder.path, ctx.is_main, start_step=self.state.step, rows=self.state.rows)

    def train(self) -> int:
        state, main = self.state, self.ctx.is_main
        self.stop.on_give_up = lambda why: main and self.folder.set_status(f"interrupted at step {state.step}: {why}")
        try:
            if not self.train_epochs():
                return self.preempted()
        except (LoaderStallError, SharedMemoryError, SourceChangedError) as exc:
            raise type(exc)(f"{exc}; {self.save_after_loader_fault()}") from None
        self.log.close()
        if main:
            self.folder.set_status(f"done at step {state.step}")
        log.info("done: best top-1 %.3f after %d epochs, %d steps; checkpoints in %s", state.best_top1,
                 self.recipe.epochs, state.step, self.folder.path)
        return 0

    def train_epochs(self) -> bool:
        """False when stopped by a signal."""
        state = self.state
        if state.epoch < self.recipe.epochs:
            # One pass over all remaining epochs: the next epoch's first batches decode during this one's evaluation.
            self.data.sampler.set_epoch(state.epoch, state.step_in_epoch, end_epoch=self.recipe.epochs)
            batches = iter(Batches(self.data.train))
            if self.recipe.runtime.copy_stream:
                batches = ahead_on_device(batches, self.ctx.device)
            if self.data.train_decode == "gpu":
                batches = decoded_on(batches, self.ctx.device)
        for _ in range(state.epoch, self.recipe.epochs):
            if not self.train_epoch(batches):
                return False
            if state.saved_step != state.step:
                self.save()  # the epoch's training, kept whatever becomes of its evaluation (a full /dev/shm, a stall)
            saved = self.save(is_best=self.close_epoch())
            self.log.epoch(state.rows)
            if not saved and state.epoch == self.recipe.epochs:
                raise FinalCheckpointError(f"the state trained to its end (step {state.step}) but the disk is full and "
                                           f"its final checkpoint was not written; {self.redo_advice()}")
            if self.stop.agreed(self.ctx.device):  # a collective
                return False
        return True

    def train_epoch(self, batches) -> bool:
        """To the epoch's end; False when it stopped on a signal (after saving)."""
        state, rt, every, per_epoch = self.state, self.recipe.runtime, self.recipe.checkpoint.every_steps, \
            self.steps_per_epoch
        started = time.perf_counter() - state.epoch_seconds
        bar = tqdm(self.log.clock.timed(itertools.islice(batches, per_epoch - state.step_in_epoch)),
                   initial=state.step_in_epoch, total=per_epoch, desc=f"epoch {state.epoch + 1}/{self.recipe.epochs}",
                   disable=None if self.ctx.is_main else True, leave=False, dynamic_ncols=True)
        self.updater.model.train()
        for batch in bar:
            state.unreadable.check(batch)
            state.step += 1
            loss, lr = self.updater(batch, state.schedule_step(per_epoch))  # schedule_step: by step_in_epoch
            state.totals.add(loss, len(batch.targets))
            state.step_in_epoch += 1
            state.epoch_seconds = time.perf_counter() - started  # current at any save, a stall's included
            stopping = not self.ctx.is_distributed and self.stop.signal_name is not None  # one process: at once
            if state.step % rt.log_interval == 0:
                at = StepPosition(state.epoch + 1, self.recipe.epochs, state.step_in_epoch, per_epoch,
                                  self.recipe.batch_size)
                self.log.step(state.step, state.totals.read_window_loss(), lr, at)
                state.check_numerics(rt.max_nonfinite_steps)
                stopping = self.stop.agreed(self.ctx.device)
            if stopping or (every and state.step % every == 0 and state.step_in_epoch < per_epoch):
                state.check_numerics(rt.max_nonfinite_steps)
                self.save()
            if stopping:
                return False
        return True  # the bar closes itself at the end of its iterable

    def close_epoch(self) -> bool:
        """The epoch's totals, evaluations and summary row; whether it is the best yet (on weights or EMA)."""
        state, updater, classes = self.state, self.updater, self.recipe.model.num_classes
        state.check_numerics(self.recipe.runtime.max_nonfinite_steps)
        stats = state.totals.finish_epoch(state.epoch_seconds)
        model, ema_model = self.eval_models
        result = evaluate(model, self.data.val, classes, updater.preprocess, updater.amp)
        at = (state.epoch + 1) * self.steps_per_epoch  # the schedule's, see RunState.schedule_step
        row = dict(epoch=state.epoch + 1, step=state.step, lr=updater.schedule(at),
                   train_size=self.recipe.data.train_size(state.epoch), train_loss=stats.loss, eval_loss=result.loss,
                   top1=result.top1, top5=result.top5)
        score = result.top1
        if updater.ema is not None:
            ema = evaluate(ema_model, self.data.val, classes, updater.preprocess, updater.amp)
            row.update(ema_eval_loss=ema.loss, ema_top1=ema.top1, ema_top5=ema.top5)
            score = max(score, ema.top1)
        is_best = score > state.best_top1
        state.best_top1 = max(state.best_top1, score)
        unreadable = all_reduce_sum(torch.tensor([float(state.unreadable.epoch_count)], device=self.ctx.device))
        state.unreadable.epoch_count = 0
        row.update(images_per_s=stats.images / max(stats.seconds, 1e-9), epoch_seconds=stats.seconds,
                   eval_seconds=result.seconds, nonfinite_steps=stats.nonfinite_steps,
                   unreadable_images=int(unreadable.item()))
        state.rows.append(row)
        state.epoch, state.step_in_epoch, state.epoch_seconds = state.epoch + 1, 0, 0.0
        return is_best

    def save(self, is_best: bool = False) -> bool:
        """All ranks gather the per-rank state, rank 0 writes; False when the disk was full."""
        state, updater = self.state, self.updater
        per_rank = all_gather_objects(state.rank_state_dict())
        if not updater.weights_are_finite():
            raise NonFiniteLossError(f"the weights are not finite at step {state.step}; "
                                     f"refusing to overwrite the last good checkpoint")
        written = True
        if self.ctx.is_main:
            checkpoint = TrainingCheckpoint(
                model=updater.model.state_dict(), optimizer=updater.optimizer.state_dict(),
                scaler=updater.scaler.state_dict(), position=state, per_rank=per_rank,
                world_size=len(per_rank), dataset=self.data.fingerprints[0], classes=self.data.train_set.classes,
                recipe=recipe_to_dict(self.recipe), model_ema=updater.ema.module.state_dict() if updater.ema else None,
                eval_dataset=self.data.fingerprints[1], batch_size=self.recipe.batch_size,
                metrics=state.rows[-1] if state.rows else None)
            written = self.folder.checkpoints.save(checkpoint.to_dict(), state.step, is_best) is not None
        written = all_gather_objects(written)[0]  # also keeps the other ranks from racing ahead of the write
        if written:
            state.saved_step = state.step
        return written

    def restore(self, checkpoint: TrainingCheckpoint) -> List[str]:
        """Returns why the rest of the run will not be exactly what it would have been, if it will not."""
        updater, state, recipe = self.updater, self.state, self.recipe
        saved_classes = checkpoint.model["head.fc.weight"].shape[0]
        if saved_classes != recipe.model.num_classes:
            raise CheckpointError(f"the checkpoint's classifier has {saved_classes} classes but the recipe has "
                                  f"model.num_classes={recipe.model.num_classes}: a run cannot change its classes "
                                  f"on resume")
        updater.model.load_state_dict(checkpoint.model)
        if updater.ema is not None:
            if checkpoint.model_ema is None:
                raise CheckpointError("this recipe keeps an EMA of the weights but the checkpoint has none; "
                                      "resume with ema.enabled=false or start a new run")
            updater.ema.module.load_state_dict(checkpoint.model_ema)
        updater.optimizer.load_state_dict(checkpoint.optimizer)
        updater.scaler.load_state_dict(checkpoint.scaler)
        state.load(checkpoint, self.ctx.rank, self.ctx.world_size)
        old_batch = checkpoint.batch_size or recipe.batch_size
        notes = [on_another_count(recipe, self.arrangement, checkpoint.world_size, old_batch)]
        if checkpoint.dataset != self.data.fingerprints[0]:
            notes.append("the training set changed since the checkpoint (files added, removed or renamed), "
                         "so the remaining order of images differs")
        if checkpoint.eval_dataset not in (None, self.data.fingerprints[1]):  # None: older checkpoints lack it
            notes.append("the evaluation set changed since the checkpoint (val/, or the held-out part of train/): "
                         "top-1 before and after this point are not comparable")
        notes.append(self.continue_with_new_batch(old_batch))
        changed = changed_keys(checkpoint.recipe, recipe_to_dict(recipe))
        if changed:
            notes.append("the recipe changed: " + ", ".join(changed))
        return [note for note in notes if note]

    def continue_with_new_batch(self, old_batch: int) -> Optional[str]:
        """A batch changed mid-epoch: go on after the images already trained, rounded down to a whole batch."""
        state, new_batch, per_epoch = self.state, self.recipe.batch_size, self.steps_per_epoch
        if old_batch == new_batch or not state.step_in_epoch:
            return None
        images = state.step_in_epoch * old_batch
        state.step_in_epoch = min(images // new_batch, per_epoch)
        goes_on = (f"from its step {state.step_in_epoch + 1} of {per_epoch}"
                   if state.step_in_epoch < per_epoch else "with its evaluation")
        return (f"the global batch changed from {old_batch} to {new_batch} in epoch {state.epoch + 1}, after {images} "
                f"of its images; it goes on {goes_on}")

    def announce(self, notes: List[str]) -> None:
        if not self.ctx.is_main:
            return
        recipe, rt, state, data, folder = self.recipe, self.recipe.runtime, self.state, self.data, self.folder
        folder.record_start(recipe_to_dict(recipe), recipe_to_yaml(recipe), self.ctx.world_size, notes,
                            trains=state.epoch < recipe.epochs)
        total = recipe.epochs * self.steps_per_epoch
        log.info("%d process(es) on %s; %d train / %d val images; lr %g (optim.lr %g x %d/%d %s); %d steps; output %s",
                 self.ctx.world_size, self.ctx.device.type, len(data.train_set), len(data.val_set), recipe.scaled_lr(),
                 recipe.optim.lr, recipe.batch_size, recipe.optim.reference_batch_size, recipe.optim.lr_scaling, total,
                 folder.path)
        log.log(logging.WARNING if self.arrangement.short_of_micro_batch else logging.INFO, self.arrangement.describe())
        if recipe.data.start_img_size:
            log.info("training crops: %s; evaluation at %d px%s", crop_sizes(recipe), recipe.data.eval_img_size,
                     "; torch.compile makes one graph per size" if rt.compile else "")
        if rt.compile or rt.compile_eval:
            parts = [f"training passes of {self.arrangement.images_per_pass} images"] if rt.compile else []
            parts += [f"evaluation batches of {data.val.batch_size} images"] if rt.compile_eval else []
            log.info("torch.compile (mode %s, static shapes): %s; a batch of another size runs without compiling",
                     rt.compile_mode, " and ".join(parts))
        if self.updater.schedule.warmup_steps >= total:
            log.warning("the warmup (%d steps) is longer than the run (%d steps); the learning rate never reaches %g",
                        self.updater.schedule.warmup_steps, total, recipe.scaled_lr())
        log.info("%s", data.jpegs)
        if folder.resumed is not None:
            log.info("resumed from %s at step %d", folder.resumed[0], state.step)
        for note in notes:
            log.info("resuming inexactly: %s", note)

    def preempted(self) -> int:
        state, signal_name = self.state, self.stop.signal_name or "a signal to another rank"
        if state.saved_step == state.step:
            log.info("stopping on %s: checkpoint saved at step %d; continue with --resume auto", signal_name,
                     state.step)
        else:
            log.warning("stopping on %s: the checkpoint of step %d could not be written (the disk is full); %s",
                        signal_name, state.step, self.redo_advice())
        if self.ctx.is_main:
            self.folder.set_status(f"preempted at step {max(state.saved_step, 0)}")
        return EXIT_PREEMPTED

    def redo_advice(self, disk_full: bool = True) -> str:
        """What to run when the newest state is not saved: after a full disk, or a loader fault on several ranks."""
        then = f"free space in {self.folder.path}, then rerun" if disk_full else "rerun"
        if self.state.saved_step < 0:
            return f"no checkpoint of this run was written; {then} with --resume auto (it starts again from step 0)"
        saved = self.state.saved_step
        return f"the newest checkpoint is of step {saved}; {then} with --resume auto to redo the steps since"

    def save_after_loader_fault(self) -> str:
        """What was saved, in words: one process saves, several cannot (docs/training.md, "A loader that stalls")."""
        state = self.state
        if state.saved_step == state.step or (not self.ctx.is_distributed and self.save()):
            return f"checkpoint saved at step {state.step}; continue with --resume auto"
        return self.redo_advice(disk_full=False)

def crop_sizes(recipe: Recipe) -> str:
    """The training crop of each stretch of epochs, counted from 1: '160 px in epochs 1-25, ...'."""
    stretches, first = [], 1
    for size, epochs in itertools.groupby(recipe.data.train_size(epoch) for epoch in range(recipe.epochs)):
        last = first + len(list(epochs)) - 1
        stretches.append(f"{size} px in " + (f"epoch {first}" if last == first else f"epochs {first}-{last}"))
        first = last + 1
    return ", ".join(stretches)


def claim_run_folder(folder: RunFolder, resume: Optional[str], ctx: DistContext) -> Resumed:
    """Rank 0 locks the folder and picks the checkpoint; every rank follows, or fails with its error."""
    error, path, checkpoint = None, None, None  # no path: a new start
    if ctx.is_main:
        try:
            folder.lock()
            path, checkpoint = folder.choose_start(resume) or (None, None)
        except (RunFolderError, CheckpointError) as exc:
            error = str(exc)
    error, path = all_gather_objects((error, path))[0]
    if error is not None:
        raise RunFolderError(error)
    if path is None:
        return None
    if not ctx.is_main:
        checkpoint = read_training_checkpoint(path)
    barrier()  # every rank has read the checkpoint before rank 0 may replace it
    return path, checkpoint


def as_it_runs(recipe: Recipe, ctx: DistContext) -> Recipe:
    """The recipe as this machine runs it (and the run folder records): GPUs before Ampere lack bf16."""
    if recipe.runtime.amp == "bf16" and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("%s has no bf16: runtime.amp=fp16 instead", torch.cuda.get_device_name(ctx.device))
        return dataclasses.replace(recipe, runtime=dataclasses.replace(recipe.runtime, amp="fp16"))
    return recipe


def with_class_count(recipe: Recipe, data: TrainingData) -> Recipe:
    """model.num_classes: auto becomes the number of class folders in train/; an explicit count must match."""
    found = len(data.train_set.classes)
    if recipe.model.num_classes == "auto":
        log.info("model.num_classes: auto -> %d, the class folders of %s", found, Path(recipe.data.dir) / "train")
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, num_classes=found))
    if found != recipe.model.num_classes:
        raise RecipeError(f"recipe key 'model.num_classes' is {recipe.model.num_classes} but {recipe.data.dir}/train "
                          f"has {found} class folders; set model.num_classes={found}, or auto")
    return recipe


def read_start_weights(recipe: Recipe, resumed: Resumed) -> Tuple[Recipe, Optional[InitialWeights]]:
    """A fresh start checks model.initial_weights before any work and records its SHA-256; a resume reads none."""
    model = recipe.model
    if resumed is not None or not model.initial_weights:
        return recipe, None
    initial = read_initial_weights(model.initial_weights, model.initial_weights_kind, model.initial_weights_sha256)
    return dataclasses.replace(recipe, model=dataclasses.replace(model, initial_weights_sha256=initial.sha256)), initial
