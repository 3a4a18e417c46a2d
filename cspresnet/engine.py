"""What the training loop and validate.py share: one training step (Updater), and evaluation."""
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, random_seed
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


def autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def configure_kernels(deterministic: bool, seed: Optional[int] = None) -> None:
    """cuDNN's benchmark picks algorithms that may differ between processes and add in another order;
    `deterministic` fixes both (and every other op), slower, so that a GPU run repeats and resumes bit for bit."""
    if seed is not None:
        random_seed(seed)  # timm's: Python's, NumPy's and torch's generators
    if deterministic:  # cuBLAS reads this when it creates its handle: before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def seed_draws(seed: int, step: int, group: int) -> None:
    """Mixup, CutMix, random erasing, dropout and drop path draw from Python's, NumPy's and torch's generators:
    seeded by (seed, step, BatchNorm group) before each pass, they draw the same on any number of processes
    (docs/training.md, "Changing the number of GPUs"), and a resume needs no generator state."""
    random_seed(int(np.random.SeedSequence((seed, step, group)).generate_state(1)[0]))  # timm's: all three


def build_criterion(mixing: bool, label_smoothing: float) -> nn.Module:
    """timm's choice: mixup/cutmix hand over soft targets with the smoothing folded in."""
    return SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling. bf16 and fp32 get a scaler pinned at 1.0 (exact), so that every precision
    skips a non-finite gradient's step the same way: on the device (with fused SGD), without a host sync."""
    return torch.amp.GradScaler(device.type, init_scale=2.0**16 if amp == "fp16" else 1.0)  # 2**16: torch's default


@dataclass
class Updater:
    """One weight update: `passes` forward/backward passes (gradient accumulation), then one optimizer step."""
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
    # The recipe's seed: with the step and the BatchNorm group it seeds each pass's random draws (training sets it).
    # None: they go on from the generators as they stand, as in timm's train loop (tests, benchmarks).
    seed: Optional[int] = None
    rank: int = 0
    processes: int = 1

    def __call__(self, batch: Batch, step: int) -> Tuple[torch.Tensor, float]:
        """The update at `step` of the schedule (from 1); its loss (on the device: reading it waits) and lr."""
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        inputs = self.preprocess(batch.images)
        targets = batch.targets.to(self.preprocess.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for k, (x, y) in enumerate(self.split(inputs, targets)):
            if self.seed is not None:
                seed_draws(self.seed, step, group=self.rank + self.processes * k)  # pass k's group, see split()
            losses.append(self.backward_pass(x, y, len(y) / len(targets), last=k == self.passes - 1))
        self.scaler.step(self.optimizer)  # skipped on the device if any gradient is inf/NaN
        self.scaler.update(None if self.amp == "fp16" else 1.0)
        if self.ema is not None:
            self.ema.update(self.model, step=step)  # step 1 copies the weights, as in timm's train.py
        return sum(losses), lr

    def split(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Pass k takes images k, k + passes, ...: those of rank r + P*k of P x passes processes (docs/training.md)."""
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
        """The loss weighted by the pass's share of the update's images; DDP averages in the last pass only."""
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


def build_updater(recipe: Recipe, ctx: DistContext, steps_per_epoch: int, arrangement: Optional[Arrangement] = None,
                  seed: Optional[int] = None) -> Updater:
    """The EMA is taken before SyncBatchNorm (it is only evaluated), then DDP and compile."""
    rt = recipe.runtime
    arrangement = arrangement or arrange(recipe, ctx.world_size)
    model = build_model(recipe.model.num_classes, recipe.model.drop_rate, recipe.model.drop_path_rate)
    if recipe.model.linear_probe:
        model.freeze_backbone()  # before the optimizer, which then takes the classifier only
    model = model.to(ctx.device, memory_format=memory_format(rt.channels_last))
    ema = ModelEmaV3(model, decay=recipe.ema.decay) if recipe.ema.enabled else None
    if arrangement.bn_group > 1:
        model = convert_to_sync_bn(model, arrangement.bn_group, ctx.world_size, ctx.device)
    updater = Updater(
        model=model, train_model=model, optimizer=build_optimizer(model, recipe),
        scaler=build_grad_scaler(ctx.device, rt.amp), schedule=build_schedule(recipe, steps_per_epoch),
        criterion=build_criterion(recipe.augment.mixing, recipe.label_smoothing),
        preprocess=DevicePreprocess(ctx.device, rt.channels_last), amp=rt.amp, ema=ema, passes=arrangement.passes,
        augment=build_batch_augment(recipe.augment, recipe.label_smoothing, recipe.model.num_classes, ctx.device),
        seed=seed, rank=ctx.rank, processes=ctx.world_size)
    if ctx.is_distributed:
        updater.ddp = DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, bucket_cap_mb=rt.ddp_bucket_cap_mb,
            gradient_as_bucket_view=rt.ddp_gradient_as_bucket_view, static_graph=rt.ddp_static_graph)
        updater.train_model = updater.ddp
    if rt.compile:
        updater.train_model = CompiledAtOneBatch(updater.train_model, arrangement.images_per_pass, rt.compile_mode)
    return updater


class CompiledAtOneBatch(nn.Module):
    """Static shapes give the fastest kernels (CUDA graphs need them) but every new shape compiles again: each crop
    size compiles once, at `batch` images; any other batch runs the plain module (docs/performance.md)."""

    def __init__(self, module: nn.Module, batch: int, mode: str = "default"):
        super().__init__()
        self.plain, self.batch = module, batch
        self.compiled = torch.compile(module, mode=mode, dynamic=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.compiled if len(inputs) == self.batch else self.plain)(inputs)


def evaluated_models(updater: Updater, rt: RuntimeConfig, batch: int) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The weights and their EMA, compiled at the evaluation batch when runtime.compile_eval."""
    ema = updater.ema.module if updater.ema is not None else None
    if not rt.compile_eval:
        return updater.model, ema
    return (CompiledAtOneBatch(updater.model, batch, rt.compile_mode),
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
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    indices, topk, targets, logits_kept, unreadable = [], [], [], [], []
    loss_sum = torch.zeros((), device=preprocess.device, dtype=torch.float64)
    start = time.perf_counter()
    for batch in progress(Batches(loader)):
        unreadable += batch.unreadable
        for index, reason in batch.unreadable:
            warn_unreadable(loader.dataset.samples[index][0], reason)
        if not len(batch.targets):
            continue
        with autocast(preprocess.device, amp):
            logits = model(preprocess(batch.images)).float()
        loss_sum += F.cross_entropy(logits, batch.targets.to(logits.device), reduction="sum").double()
        topk.append(logits.topk(k, dim=1).indices.cpu())
        targets.append(batch.targets)
        indices.append(batch.indices)
        if keep_logits:
            logits_kept.append(logits.cpu())
    seconds = time.perf_counter() - start
    model.train(was_training)

    def cat(values, *shape):
        return torch.cat(values) if values else torch.empty(0, *shape, dtype=torch.long)

    logits = torch.cat(logits_kept) if logits_kept else torch.empty(0, num_classes)
    mine = (cat(indices), cat(topk, k), cat(targets), unreadable, logits)
    return gathered(mine, all_reduce_sum(loss_sum).item(), len(loader.dataset), seconds, keep_logits)


def gathered(mine: tuple, loss_total: float, dataset_size: int, seconds: float, keep_logits: bool) -> EvalResult:
    """Every rank's share in dataset order (an all_gather): the dataset indices (evaluated plus unreadable)
    must be 0..N-1 with no gaps and no repeats, or the evaluation is wrong."""
    parts = all_gather_objects(mine)
    order = torch.cat([g[0] for g in parts])
    unreadable = sorted(pair for g in parts for pair in g[3])
    every = torch.cat([order, torch.tensor([index for index, _ in unreadable], dtype=torch.long)])
    if every.numel() != dataset_size or not torch.equal(every.sort().values, torch.arange(dataset_size)):
        raise RuntimeError(f"evaluation covered {every.numel()} images with gaps or repeats; expected each of "
                           f"{dataset_size} once")
    ascending = order.argsort()
    predictions = torch.cat([g[1] for g in parts])[ascending]
    targets = torch.cat([g[2] for g in parts])[ascending]
    hits = predictions == targets[:, None]
    evaluated = len(targets)
    return EvalResult(top1=100.0 * hits[:, 0].double().mean().item() if evaluated else 0.0,
                      top5=100.0 * hits.any(dim=1).double().mean().item() if evaluated else 0.0,
                      loss=loss_total / max(evaluated, 1), images=evaluated, unreadable=unreadable, seconds=seconds,
                      predictions=predictions, targets=targets, indices=order[ascending],
                      logits=torch.cat([g[4] for g in parts])[ascending] if keep_logits else None)
