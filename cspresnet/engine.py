"""What the training loop and validate.py share: one training step (Updater), and
evaluation. It knows the model, a loader, the optimizer and a loss; not the run folder, the
log or how a run stops (cspresnet/training.py)."""
import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.errors import UnreadableDataError
from common.processes import DistContext
from data.batches import Batch
from data.loader_faults import Batches
from data.transforms import DevicePreprocess, build_batch_augment, memory_format
from data.unreadable import warn_unreadable

from .arrangement import Arrangement, arrange
from .distributed import all_gather_objects, all_reduce_sum
from .model import build_model
from .optim import build_optimizer, build_schedule, set_lr
from .recipe import Recipe, RuntimeConfig
from .sync_bn import convert_to_sync_bn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_kernels(deterministic: bool, seed: Optional[int] = None) -> None:
    """By default cuDNN times its convolution algorithms and keeps the fastest, which may
    differ from one process to the next and may add in a different order; `deterministic`
    fixes both (and asks for deterministic versions of every other op), at a cost in speed,
    so that a run on a GPU repeats, and resumes, bit for bit. `seed` seeds Python's, NumPy's
    and torch's generators (a run's first draws)."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    if deterministic:
        # cuBLAS reads this when it creates its handle; it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def build_criterion(mixing: bool, label_smoothing: float) -> nn.Module:
    """timm's choice: mixup/cutmix hand over soft targets with the smoothing folded in,
    so they take the soft-target cross-entropy; hard targets take the smoothed one."""
    if mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling. bf16 and fp32 get a scaler pinned at 1.0, which changes no
    number (x1.0 is exact) and gives every precision the same behaviour on a non-finite
    gradient: the step is skipped on the device (with fused SGD), without a host sync."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0)


@dataclass
class Updater:
    """One weight update: `passes` forward/backward passes over this process's share of the
    global batch (gradient accumulation), then one optimizer step; and everything it needs
    around the model."""

    model: nn.Module  # what is trained and saved
    train_model: nn.Module  # the same model, maybe wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Callable[[int], float]  # step number (from 1) -> learning rate
    criterion: nn.Module
    preprocess: DevicePreprocess
    amp: str
    augment: Optional[Callable] = None  # (inputs, targets) -> (inputs, targets) on the device: erasing, mixup
    ema: Optional[ModelEmaV3] = None  # moving average of the weights, updated after every step
    passes: int = 1  # forward/backward passes per update
    ddp: Optional[DistributedDataParallel] = None  # train_model's DDP wrapper, whose sync waits for the last pass

    def __call__(self, batch: Batch, step: int) -> Tuple[torch.Tensor, float]:
        """The optimizer update at `step` of the schedule (from 1; RunState.schedule_step);
        its loss (on the device: reading it would wait for the device) and learning rate. The
        schedule, the skip of a non-finite update and the EMA act once per update, never per pass."""
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        inputs = self.preprocess(batch.images)
        targets = batch.targets.to(self.preprocess.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        losses = [self.backward_pass(x, y, len(y) / len(targets), last=k == self.passes - 1)
                  for k, (x, y) in enumerate(self.split(inputs, targets))]
        self.scaler.step(self.optimizer)  # skipped on the device if any gradient is inf/NaN
        self.scaler.update(None if self.amp == "fp16" else 1.0)
        if self.ema is not None:
            self.ema.update(self.model, step=step)  # step 1 copies the weights, as in timm's train.py
        return sum(losses), lr

    def split(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The update's images in `passes` strided slices: pass k takes images k, k + passes, ...
        The sampler deals rank r of P every P-th image, so pass k of rank r gets exactly the
        images that rank r + P*k of P x passes processes would get in one pass: accumulation
        and more processes train on the same batches."""
        if self.passes == 1:
            yield inputs, targets
            return
        if len(targets) < self.passes:
            raise UnreadableDataError(f"only {len(targets)} images of a batch could be decoded, fewer than its "
                                      f"{self.passes} passes; lower data.max_unreadable_batch_fraction")
        for k in range(self.passes):
            yield inputs[k::self.passes].contiguous(memory_format=self.preprocess.memory_format), \
                targets[k::self.passes]

    def backward_pass(self, inputs: torch.Tensor, targets: torch.Tensor, weight: float, last: bool) -> torch.Tensor:
        """Forward and backward over one pass that holds `weight` of the update's images: its
        loss is scaled by that weight, so the summed gradients are those of the mean loss over
        all of them, as in one big pass. DDP averages the gradients over the processes only
        in the update's last pass."""
        with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
            if self.augment is not None:
                inputs, targets = self.augment(inputs, targets)  # mixup within the pass, as timm's accumulation
            with autocast(self.preprocess.device, self.amp):
                loss = self.criterion(self.train_model(inputs), targets) * weight
            self.scaler.scale(loss).backward()
        return loss.detach()

    def weights_are_finite(self) -> bool:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all())


def build_updater(recipe: Recipe, ctx: DistContext, steps_per_epoch: int,
                     arrangement: Optional[Arrangement] = None) -> Updater:
    """The model on its device and everything around it: its EMA (a copy with plain
    BatchNorm: it is only evaluated), SyncBatchNorm, then DDP when there are several
    processes, compiled when the recipe says so. `arrangement`: the run's (default: the
    recipe's on ctx's processes, for a caller that has none)."""
    rt = recipe.runtime
    arrangement = arrangement or arrange(recipe, ctx.world_size)
    model = build_model(recipe.model.num_classes, recipe.model.drop_rate, recipe.model.drop_path_rate)
    if recipe.model.linear_probe:
        model.freeze_backbone()  # before the optimizer, which then takes the classifier only
    model = model.to(ctx.device, memory_format=memory_format(rt.channels_last))
    ema = ModelEmaV3(model, decay=recipe.ema.decay) if recipe.ema.enabled else None
    if arrangement.bn_group > 1:
        model = convert_to_sync_bn(model, arrangement.bn_group, ctx.world_size, ctx.device)
    step = Updater(
        model=model, train_model=model, optimizer=build_optimizer(model, recipe),
        scaler=build_grad_scaler(ctx.device, rt.amp), schedule=build_schedule(recipe, steps_per_epoch),
        criterion=build_criterion(recipe.mixing(), recipe.label_smoothing),
        preprocess=DevicePreprocess(ctx.device, rt.channels_last), amp=rt.amp,
        augment=build_batch_augment(recipe.augment, recipe.label_smoothing, recipe.model.num_classes, ctx.device),
        ema=ema, passes=arrangement.passes,
    )
    if ctx.is_distributed:
        step.ddp = DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, bucket_cap_mb=rt.ddp_bucket_cap_mb,
            gradient_as_bucket_view=rt.ddp_gradient_as_bucket_view, static_graph=rt.ddp_static_graph)
        step.train_model = step.ddp
    if rt.compile:
        step.train_model = CompiledAtOneBatch(step.train_model, arrangement.images_per_pass, rt.compile_mode)
    return step


class CompiledAtOneBatch(nn.Module):
    """`module` through torch.compile with static shapes, for inputs of one batch size.

    Static shapes give the fastest kernels (and CUDA graphs need them), but every new input
    shape compiles again, and with CUDA graphs records another graph. Each crop size of a
    progressive-resizing recipe compiles once, at `batch` images; inputs of any other size (a
    training batch short of unreadable images, an evaluation's last batch) run the plain
    module instead of compiling again, every epoch."""

    def __init__(self, module: nn.Module, batch: int, mode: str = "default"):
        super().__init__()
        self.plain, self.batch = module, batch
        self.compiled = torch.compile(module, mode=mode, dynamic=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.compiled if len(inputs) == self.batch else self.plain)(inputs)


def evaluated_models(step: Updater, rt: RuntimeConfig, batch: int) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The weights and their EMA as evaluation runs them: through torch.compile at the
    evaluation loader's batch when runtime.compile_eval (its last, smaller batch runs plain)."""
    ema = step.ema.module if step.ema is not None else None
    if not rt.compile_eval:
        return step.model, ema
    return (CompiledAtOneBatch(step.model, batch, rt.compile_mode),
            CompiledAtOneBatch(ema, batch, rt.compile_mode) if ema is not None else None)


@dataclass
class EvalResult:
    top1: float  # percent, as timm reports it
    top5: float
    loss: float  # plain cross-entropy, no label smoothing
    images: int  # images evaluated (all ranks)
    unreadable: List[Tuple[int, str]]  # (dataset index, reason) of the images that could not be decoded
    seconds: float
    predictions: torch.Tensor  # (images, k) top-k class ids, in dataset order of the evaluated images
    targets: torch.Tensor  # (images,)
    indices: torch.Tensor  # (images,) their dataset indices, ascending
    logits: Optional[torch.Tensor] = None  # (images, classes) float32, when asked for

    def per_class_top1(self, num_classes: int) -> List[float]:
        correct = (self.predictions[:, 0] == self.targets).double()
        hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, self.targets, correct)
        counts = torch.bincount(self.targets, minlength=num_classes).double()
        return (100.0 * hits / counts.clamp(min=1)).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, preprocess: DevicePreprocess, amp: str,
             progress: Callable = lambda iterable: iterable, keep_logits: bool = False) -> EvalResult:
    """Evaluate this rank's share of loader.dataset, then gather every rank's predictions.

    Each image is counted exactly once: the gathered dataset indices (evaluated plus
    unreadable) must be 0..N-1 with no gaps and no repeats, or the evaluation is wrong.
    """
    was_training = model.training
    model.eval()
    found = EvalParts(min(5, num_classes), num_classes, keep_logits, preprocess.device)
    start = time.perf_counter()
    for batch in progress(Batches(loader)):
        for index, reason in batch.unreadable:
            warn_unreadable(loader.dataset.samples[index][0], reason)
        if len(batch.targets):
            with autocast(preprocess.device, amp):
                logits = model(preprocess(batch.images)).float()
            found.add(batch, logits)
        else:
            found.add(batch, None)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return found.gather(len(loader.dataset), seconds)


class EvalParts:
    """One rank's share of an evaluation as it goes, and every rank's gathered in dataset order."""

    def __init__(self, k: int, num_classes: int, keep_logits: bool, device: torch.device):
        self.k, self.num_classes, self.keep_logits = k, num_classes, keep_logits
        self.indices, self.topk, self.targets, self.logits = [], [], [], []
        self.unreadable: List[Tuple[int, str]] = []
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, batch: Batch, logits: Optional[torch.Tensor]) -> None:
        self.unreadable += batch.unreadable
        if logits is None:
            return
        self.loss_sum += F.cross_entropy(logits, batch.targets.to(logits.device), reduction="sum").double()
        self.topk.append(logits.topk(self.k, dim=1).indices.cpu())
        self.targets.append(batch.targets)
        self.indices.append(batch.indices)
        if self.keep_logits:
            self.logits.append(logits.cpu())

    def gather(self, dataset_size: int, seconds: float) -> EvalResult:
        """Every rank's share, in dataset order (collectives: all_reduce, all_gather)."""
        def cat(values, *shape):
            return torch.cat(values) if values else torch.empty(0, *shape, dtype=torch.long)

        loss_total = all_reduce_sum(self.loss_sum).item()
        logits = torch.cat(self.logits) if self.logits else torch.empty(0, self.num_classes)
        gathered = all_gather_objects((cat(self.indices), cat(self.topk, self.k), cat(self.targets),
                                       self.unreadable, logits))
        order = torch.cat([g[0] for g in gathered])
        unreadable = sorted(pair for g in gathered for pair in g[3])
        every = torch.cat([order, torch.tensor([index for index, _ in unreadable], dtype=torch.long)])
        if every.numel() != dataset_size or not torch.equal(every.sort().values, torch.arange(dataset_size)):
            raise RuntimeError(f"evaluation covered {every.numel()} images with gaps or repeats; expected each of "
                               f"{dataset_size} once")
        ascending = order.argsort()
        predictions = torch.cat([g[1] for g in gathered])[ascending]
        targets = torch.cat([g[2] for g in gathered])[ascending]
        hits = predictions == targets[:, None]
        evaluated = len(targets)
        return EvalResult(
            top1=100.0 * hits[:, 0].double().mean().item() if evaluated else 0.0,
            top5=100.0 * hits.any(dim=1).double().mean().item() if evaluated else 0.0,
            loss=loss_total / max(evaluated, 1), images=evaluated, unreadable=unreadable, seconds=seconds,
            predictions=predictions, targets=targets, indices=order[ascending],
            logits=torch.cat([g[4] for g in gathered])[ascending] if self.keep_logits else None,
        )
