"""A training run, top to bottom: one TrainingRun owns it.

    train()                    arrange the batch (an impossible cut stops here); the run folder:
                               rank 0 locks it and picks the checkpoint, every rank follows
      TrainingRun(...)         the data, the step (model, SyncBN, optimizer, schedule, DDP, compile),
                               the initial weights on a fresh start, the checkpoint on a resume;
                               rank 0 records the start and says what runs
      .train()                 under the stop watchdog; how the run ends (status)
        .train_epochs()        for each remaining epoch:
          .train_epoch()         steps to the epoch's end; on a signal: checkpoint, exit 75
          .save()                the epoch's training, before its evaluation
          .evaluate()            the weights, and their EMA
          .save(is_best)         step-<N>.pt, last.pt, best.pt

engine.py holds what this loop and validate.py share: TrainStep (one optimizer update) and
evaluate. This module alone knows the run folder, the log and the stop protocol.

Every rank must reach these collectives in the same order, or the job hangs until
runtime.collective_timeout_s: the decision in claim_run_folder (all_gather) and the barrier
after loading the checkpoint; DDP's buffer broadcast in every forward pass and its gradient
all-reduce in the last backward pass of every update; with SyncBatchNorm, all-reduces in
every BatchNorm's forward and backward (within its group); every runtime.log_interval steps
the non-finite check (all_reduce MAX) and the stop agreement (all_reduce); in every save two
all_gathers (per-rank state, whether it was written); at each epoch's end the totals
(all_reduce), each evaluation (all_reduce, all_gather) and the unreadable count (all_reduce).
Everything that decides whether to call one of them is the same on every rank (step
numbers, agreed flags), never rank-local.
"""
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from data.device_feed import ahead_on_device, decoded_on
from data.errors import (CheckpointError, FinalCheckpointError, LoaderStallError, NonFiniteLossError, RecipeError,
                         RunFolderError, SharedMemoryError, SourceChangedError)
from data.loader_faults import Batches
from data.loaders import TrainingData, build_training_data
from data.transforms import decode_path
from data.unreadable import UnreadableImages

from .arrangement import arrange
from .checkpoint_schema import TrainingCheckpoint, read_training_checkpoint
from .distributed import DistContext, all_gather_objects, all_reduce_sum, barrier
from .engine import build_train_step, configure_kernels, evaluate, evaluated_models
from .recipe import Recipe, RuntimeConfig, changed_keys, recipe_to_dict, recipe_to_yaml
from .run_folder import RunFolder
from .run_log import RunLog
from .run_state import EpochTotals, RunState, dataset_fingerprint, seed_everything
from .signals import EXIT_PREEMPTED, StartInterrupted, StopRequest
from .weights import InitialWeights, apply_initial_weights, read_initial_weights

log = logging.getLogger(__name__)
Resumed = Optional[Tuple[Path, TrainingCheckpoint]]  # the checkpoint to continue from, and what it holds


def train(recipe: Recipe, ctx: DistContext, output: Path, resume: Optional[str] = None,
          early_signals: Optional[List[int]] = None) -> int:
    """Train; returns the process exit code: 0, or EXIT_PREEMPTED after a stop signal (also
    one during the start, where there is nothing to save). `early_signals`: stop signals
    that came before this call (train.py records them while Python imports)."""
    arrange(recipe, ctx.world_size)  # an impossible arrangement is refused before anything is touched
    folder = RunFolder(output, recipe.checkpoint.keep_last)
    with folder.released_at_exit(), StopRequest(recipe.runtime.stop_timeout_s, early_signals=early_signals) as stop:
        resumed = claim_run_folder(folder, resume, ctx)
        step = resumed[1].step if resumed else 0  # of the newest checkpoint: where the run stands until it trains
        stop.on_give_up = lambda reason: ctx.is_main and folder.set_status(f"interrupted at step {step}: {reason}")
        with folder.failure_recorded(ctx.is_main):
            try:
                stop.arm_start()
                run = TrainingRun(recipe, ctx, folder, resumed, stop)
            except StartInterrupted as exc:
                log.info("stopping on %s during the start, before any training: %s; continue with --resume auto", exc,
                         f"the newest checkpoint is still of step {step}" if resumed else
                         "nothing of this run was trained yet")
                if ctx.is_main:
                    folder.set_status(f"preempted at step {step}")
                return EXIT_PREEMPTED
            return run.train()


class TrainingRun:
    """Everything that lives as long as the run: the recipe as it runs, the processes, the run
    folder, the data, the training step, where the run is (RunState), and, while it trains,
    its log and its stop request."""

    def __init__(self, recipe: Recipe, ctx: DistContext, folder: RunFolder, resumed: Resumed, stop: StopRequest):
        recipe, initial = read_start_weights(as_it_runs(recipe, ctx), resumed)
        configure_kernels(recipe.runtime.deterministic)
        seed_everything(recipe.seed)
        self.data: TrainingData = build_training_data(recipe.data, recipe.batch_size, recipe.seed, ctx)
        self.recipe = recipe = with_class_count(recipe, self.data)
        self.ctx, self.folder, self.arrangement = ctx, folder, arrange(recipe, ctx.world_size)
        self.steps_per_epoch = self.data.sampler.steps_per_epoch
        self.step = build_train_step(recipe, ctx, self.steps_per_epoch, self.arrangement)
        self.eval_models = evaluated_models(self.step, recipe.runtime, self.data.val.batch_size)
        if initial is not None:
            models = [self.step.model] + ([self.step.ema.module] if self.step.ema is not None else [])
            log.info("%s", apply_initial_weights(initial, models, self.data.train_set.classes))
        d = recipe.data
        self.state = RunState(
            EpochTotals(ctx.device),
            UnreadableImages(self.data.train_set.samples, d.max_unreadable_batch_fraction, d.max_unreadable_fraction,
                             d.min_unreadable_allowed),
            datasets=(dataset_fingerprint(self.data.train_set.samples), dataset_fingerprint(self.data.val_set.samples)))
        notes = self.restore(resumed[1]) if resumed else []
        self.stop = stop
        stop.training()  # before the run folder's files are written: a stop now waits for a step's end and a save
        self.announce(resumed, notes)
        self.log: Optional[RunLog] = None  # while it trains

    # ------------------------------------------------------------------------- the loop

    def train(self) -> int:
        """The epochs from where the run is to the recipe's last, and how the run ends."""
        run, main = self.state, self.ctx.is_main
        self.log = RunLog(self.folder.path, main, start_step=run.step, rows=run.rows)
        self.stop.on_give_up = lambda reason: main and self.folder.set_status(f"interrupted at step {run.step}: {reason}")
        try:
            if not self.train_epochs():
                return self.preempted()
        except (LoaderStallError, SharedMemoryError, SourceChangedError) as exc:
            raise type(exc)(f"{exc}; {self.save_after_loader_fault()}") from None
        self.log.close()
        if main:
            self.folder.set_status(f"done at step {run.step}")
        log.info("done: best top-1 %.3f after %d epochs, %d steps; checkpoints in %s", run.best_top1,
                 self.recipe.epochs, run.step, self.folder.path)
        return 0

    def train_epochs(self) -> bool:
        """Train, save, evaluate and save each remaining epoch; False when stopped by a signal."""
        run = self.state
        if run.epoch < self.recipe.epochs:
            # One pass over all remaining epochs: the workers decode the next epoch's first
            # batches while this one ends and is evaluated, so the GPU does not wait for them.
            self.data.sampler.set_epoch(run.epoch, run.step_in_epoch, end_epoch=self.recipe.epochs)
            batches = iter(Batches(self.data.train))
            if self.recipe.runtime.copy_stream:
                batches = ahead_on_device(batches, self.ctx.device)
            if self.data.train_decode == "gpu":
                batches = decoded_on(batches, self.ctx.device)
        for _ in range(run.epoch, self.recipe.epochs):
            if not self.train_epoch(batches):
                return False
            if run.saved_step != run.step:
                self.save()  # the epoch's training, kept whatever becomes of its evaluation (a full /dev/shm, a stall)
            saved = self.save(is_best=self.evaluate())
            self.log.epoch(run.rows)
            if not saved and run.epoch == self.recipe.epochs:
                raise FinalCheckpointError(f"the run trained to its end (step {run.step}) but the disk is full and "
                                           f"its final checkpoint was not written; {self.redo_advice()}")
            if self.stop.agreed(self.ctx.device):  # a collective
                return False
        return True

    def train_epoch(self, batches) -> bool:
        """From run.step_in_epoch to the epoch's end, saving every checkpoint.every_steps;
        False when it stopped on a signal (after saving). Every runtime.log_interval steps all
        ranks read the loss, check for non-finite losses and agree on stopping (collectives)."""
        run, rt, every, per_epoch = self.state, self.recipe.runtime, self.recipe.checkpoint.every_steps, \
            self.steps_per_epoch
        started = time.perf_counter() - run.epoch_seconds
        bar = tqdm(itertools.islice(batches, per_epoch - run.step_in_epoch), initial=run.step_in_epoch,
                   total=per_epoch, desc=f"epoch {run.epoch + 1}/{self.recipe.epochs}",
                   disable=None if self.ctx.is_main else True, leave=False, dynamic_ncols=True)
        self.step.model.train()
        for batch in bar:
            run.unreadable.check(batch)
            position = run.schedule_position(per_epoch)
            run.step += 1
            loss, lr = self.step(batch, position)
            run.totals.add(loss, len(batch.targets))
            run.step_in_epoch += 1
            run.epoch_seconds = time.perf_counter() - started  # current at any save, a stall's included
            stopping = False
            if run.step % rt.log_interval == 0:
                self.log.step(run.step, run.totals.read_window_loss(), lr)
                run.check_numerics(rt.max_nonfinite_steps)
                stopping = self.stop.agreed(self.ctx.device)
            elif not self.ctx.is_distributed:
                stopping = self.stop.signal_name is not None  # one process: no need to agree, stop at once
            if stopping or (every and run.step % every == 0 and run.step_in_epoch < per_epoch):
                run.check_numerics(rt.max_nonfinite_steps)
                self.save()
            if stopping:
                return False
        bar.close()
        return True

    def evaluate(self) -> bool:
        """Close the epoch: its totals, the evaluation of the weights (and of their EMA), its
        summary row; whether it is the best epoch yet (on the better of the two)."""
        run, step, classes = self.state, self.step, self.recipe.model.num_classes
        run.check_numerics(self.recipe.runtime.max_nonfinite_steps)
        stats = run.totals.finish_epoch(run.epoch_seconds)
        model, ema_model = self.eval_models
        result = evaluate(model, self.data.val, classes, step.preprocess, step.amp)
        position = (run.epoch + 1) * self.steps_per_epoch  # the schedule's, see RunState.schedule_position
        row = dict(epoch=run.epoch + 1, step=run.step, lr=step.schedule(position),
                   train_size=self.recipe.data.train_size(run.epoch), train_loss=stats.loss, eval_loss=result.loss,
                   top1=result.top1, top5=result.top5)
        score = result.top1
        if step.ema is not None:
            ema = evaluate(ema_model, self.data.val, classes, step.preprocess, step.amp)
            row.update(ema_eval_loss=ema.loss, ema_top1=ema.top1, ema_top5=ema.top5)
            score = max(score, ema.top1)
        is_best = score > run.best_top1
        run.best_top1 = max(run.best_top1, score)
        unreadable = all_reduce_sum(torch.tensor([float(run.unreadable.epoch_count)], device=self.ctx.device))
        run.unreadable.epoch_count = 0
        row.update(images_per_s=stats.images_per_s, epoch_seconds=stats.seconds, eval_seconds=result.seconds,
                   nonfinite_steps=stats.nonfinite_steps, unreadable_images=int(unreadable.item()))
        run.rows.append(row)
        run.epoch, run.step_in_epoch, run.epoch_seconds = run.epoch + 1, 0, 0.0
        return is_best

    def save(self, is_best: bool = False) -> bool:
        """All ranks: gather the per-rank state; rank 0 writes. False when the disk was full.
        Never writes non-finite weights."""
        run = self.state
        per_rank = all_gather_objects(run.rank_state_dict())
        if not self.step.weights_are_finite():
            raise NonFiniteLossError(f"the weights are not finite at step {run.step}; "
                                     f"refusing to overwrite the last good checkpoint")
        written = True
        if self.ctx.is_main:
            written = self.folder.checkpoints.save(self.checkpoint(per_rank).to_dict(), run.step, is_best) is not None
        written = all_gather_objects(written)[0]  # also keeps the other ranks from racing ahead of the write
        if written:
            run.saved_step = run.step
        return written

    def checkpoint(self, per_rank: List[dict]) -> TrainingCheckpoint:
        step, run = self.step, self.state
        return TrainingCheckpoint(
            model=step.model.state_dict(), optimizer=step.optimizer.state_dict(), scaler=step.scaler.state_dict(),
            model_ema=step.ema.module.state_dict() if step.ema else None, **run.position(), per_rank=per_rank,
            world_size=len(per_rank), dataset=run.datasets[0], eval_dataset=run.datasets[1],
            batch_size=self.recipe.batch_size, classes=self.data.train_set.classes, recipe=recipe_to_dict(self.recipe),
            metrics=run.rows[-1] if run.rows else None)

    # ------------------------------------------------------------------------- how it began and ends

    def restore(self, checkpoint: TrainingCheckpoint) -> List[str]:
        """Put the run back where the checkpoint left it; returns why the rest of the run will
        not be exactly what it would have been, if it will not."""
        step, run, recipe = self.step, self.state, self.recipe
        saved_classes = checkpoint.model["head.fc.weight"].shape[0]
        if saved_classes != recipe.model.num_classes:
            raise CheckpointError(f"the checkpoint's classifier has {saved_classes} classes but the recipe has "
                                  f"model.num_classes={recipe.model.num_classes}: a run cannot change its classes "
                                  f"on resume")
        step.model.load_state_dict(checkpoint.model)
        if step.ema is not None:
            if checkpoint.model_ema is None:
                raise CheckpointError("this recipe keeps an EMA of the weights but the checkpoint has none; "
                                      "resume with ema.enabled=false or start a new run")
            step.ema.module.load_state_dict(checkpoint.model_ema)
        step.optimizer.load_state_dict(checkpoint.optimizer)
        step.scaler.load_state_dict(checkpoint.scaler)
        notes = [run.load(checkpoint, self.ctx.rank, self.ctx.world_size, recipe.seed)]
        if checkpoint.dataset != run.datasets[0]:
            notes.append("the training set changed since the checkpoint (files added, removed or renamed), "
                         "so the remaining order of images differs")
        if checkpoint.eval_dataset not in (None, run.datasets[1]):  # None: a checkpoint from before it was kept
            notes.append("the evaluation set changed since the checkpoint (val/, or the held-out part of train/): "
                         "top-1 before and after this point are not comparable")
        notes.append(self.continue_with_new_batch(checkpoint.batch_size or recipe.batch_size))
        changed = changed_keys(checkpoint.recipe, recipe_to_dict(recipe))
        if changed:
            notes.append("the recipe changed: " + ", ".join(changed))
        return [note for note in notes if note]

    def continue_with_new_batch(self, old_batch: int) -> Optional[str]:
        """A global batch changed in the middle of an epoch: go on after the images already
        trained, rounded down to a whole batch (the learning rate follows the position:
        RunState.schedule_position)."""
        run, new_batch, per_epoch = self.state, self.recipe.batch_size, self.steps_per_epoch
        if old_batch == new_batch or not run.step_in_epoch:
            return None
        images = run.step_in_epoch * old_batch
        run.step_in_epoch = min(images // new_batch, per_epoch)
        goes_on = (f"from its step {run.step_in_epoch + 1} of {per_epoch}"
                   if run.step_in_epoch < per_epoch else "with its evaluation")
        return (f"the global batch changed from {old_batch} to {new_batch} in epoch {run.epoch + 1}, after {images} "
                f"of its images; it goes on {goes_on}")

    def announce(self, resumed: Resumed, notes: List[str]) -> None:
        """Rank 0 records the run's start or resume in its folder and says what it is doing."""
        if not self.ctx.is_main:
            return
        recipe, run, data, folder = self.recipe, self.state, self.data, self.folder
        folder.checkpoints.remove_partial_files()
        if resumed is None:
            folder.write_recipe(recipe_to_yaml(recipe))
        if run.epoch < recipe.epochs:
            folder.add_segment(run.step, recipe_to_dict(recipe), self.ctx.world_size, notes,
                               resumed[0] if resumed else None)
            folder.set_status(f"running from step {run.step}")
        total = recipe.epochs * self.steps_per_epoch
        log.info("%d process(es) on %s; %d train / %d val images; lr %g (optim.lr %g x %d/%d %s); %d steps; output %s",
                 self.ctx.world_size, self.ctx.device.type, len(data.train_set), len(data.val_set), recipe.scaled_lr(),
                 recipe.optim.lr, recipe.batch_size, recipe.optim.reference_batch_size, recipe.optim.lr_scaling, total,
                 folder.path)
        log.log(logging.WARNING if self.arrangement.short_of_micro_batch else logging.INFO, self.arrangement.describe())
        if recipe.data.start_img_size:
            log.info("training crops: %s; evaluation at %d px%s", crop_sizes(recipe), recipe.data.eval_img_size,
                     "; torch.compile makes one graph per size" if recipe.runtime.compile else "")
        if recipe.runtime.compile or recipe.runtime.compile_eval:
            log.info("%s", compiled_what(recipe.runtime, self.arrangement.images_per_pass, data.val.batch_size))
        if self.step.schedule.warmup_steps >= total:
            log.warning("the warmup (%d steps) is longer than the run (%d steps); the learning rate never reaches %g",
                        self.step.schedule.warmup_steps, total, recipe.scaled_lr())
        log.info("training JPEGs: %s; evaluation JPEGs: %s", decode_path(data.train_decode),
                 decode_path(recipe.data.eval_decode))
        if resumed is not None:
            log.info("resumed from %s at step %d", resumed[0], run.step)
        for note in notes:
            log.info("resuming inexactly: %s", note)

    def preempted(self) -> int:
        """The stop's outcome, as it is on disk: the newest checkpoint that was written."""
        run, signal_name = self.state, self.stop.signal_name or "a signal to another rank"
        if run.saved_step == run.step:
            log.info("stopping on %s: checkpoint saved at step %d; continue with --resume auto", signal_name, run.step)
        else:
            log.warning("stopping on %s: the checkpoint of step %d could not be written (the disk is full); %s",
                        signal_name, run.step, self.redo_advice())
        if self.ctx.is_main:
            self.folder.set_status(f"preempted at step {max(run.saved_step, 0)}")
        return EXIT_PREEMPTED

    def redo_advice(self) -> str:
        """What to run after the checkpoint of run.step could not be written, and what it will redo."""
        if self.state.saved_step < 0:
            return (f"no checkpoint of this run was written; free space in {self.folder.path}, then rerun with "
                    f"--resume auto (it starts again from step 0)")
        return (f"the newest checkpoint is of step {self.state.saved_step}; free space in {self.folder.path}, then "
                f"rerun with --resume auto to redo the steps since")

    def save_after_loader_fault(self) -> str:
        """After the loader failed to deliver: one process saves where it got to (its state is
        whole, between two steps); several cannot, since the others wait in a collective that
        this rank will not join. Returns what was saved, in words."""
        run = self.state
        if run.saved_step == run.step or (not self.ctx.is_distributed and self.save()):
            return f"checkpoint saved at step {run.step}; continue with --resume auto"
        if run.saved_step < 0:
            return "no checkpoint of this run was written; rerun with --resume auto (it starts again from step 0)"
        return f"the newest checkpoint is of step {run.saved_step}; continue from it with --resume auto"


def crop_sizes(recipe: Recipe) -> str:
    """The training crop of each stretch of epochs, counted from 1: '160 px in epochs 1-25, ...'."""
    sizes = [recipe.data.train_size(epoch) for epoch in range(recipe.epochs)]
    stretches, first = [], 0
    for epoch in range(1, len(sizes) + 1):
        if epoch == len(sizes) or sizes[epoch] != sizes[first]:
            span = f"epoch {first + 1}" if epoch == first + 1 else f"epochs {first + 1}-{epoch}"
            stretches.append(f"{sizes[first]} px in {span}")
            first = epoch
    return ", ".join(stretches)


def compiled_what(rt: RuntimeConfig, train_batch: int, eval_batch: int) -> str:
    """The start's line on torch.compile: what is compiled, at which static batch."""
    parts = [f"training passes of {train_batch} images"] if rt.compile else []
    parts += [f"evaluation batches of {eval_batch} images"] if rt.compile_eval else []
    return (f"torch.compile (mode {rt.compile_mode}, static shapes): {' and '.join(parts)}; a batch of another "
            f"size runs without compiling")


def claim_run_folder(folder: RunFolder, resume: Optional[str], ctx: DistContext) -> Resumed:
    """Rank 0 locks the folder and picks the checkpoint to continue from; every rank follows
    its decision, or fails with its error."""
    decision, checkpoint = ("start",), None
    if ctx.is_main:
        try:
            folder.lock()
            found = folder.choose_start(resume)
            if found is not None:
                decision, checkpoint = ("resume", str(found[0])), found[1]
        except (RunFolderError, CheckpointError) as exc:
            decision = ("error", str(exc))
    decision = all_gather_objects(decision)[0]
    if decision[0] == "error":
        raise RunFolderError(decision[1])
    if decision[0] == "start":
        return None
    if not ctx.is_main:
        checkpoint = read_training_checkpoint(Path(decision[1]))
    barrier()  # every rank has read the checkpoint before rank 0 may replace it
    return Path(decision[1]), checkpoint


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
