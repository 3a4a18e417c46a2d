"""The training step, the per-epoch running totals, and evaluation."""
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from data.loader import Batch

from .distributed import all_gather_objects, all_reduce_sum
from .optim import set_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops, the last checkpoint stays as it was."""


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_kernels(deterministic: bool) -> None:
    """By default cuDNN times its convolution algorithms and keeps the fastest, which may
    differ from one process to the next and may add in a different order; `deterministic`
    fixes both (and asks for deterministic versions of every other op), at a cost in speed,
    so that a run on a GPU repeats, and resumes, bit for bit."""
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
class EpochTotals:
    """Running sums for the current epoch, kept on the device so that no step waits for them."""

    device: torch.device
    sums: torch.Tensor = None  # [loss x images, images with a finite loss, non-finite steps]
    streak: torch.Tensor = None  # current run of non-finite losses
    max_streak: torch.Tensor = None  # longest run since the last check
    window: torch.Tensor = None  # [loss sum, steps] since the last log line
    images: int = 0  # images trained on (decodable ones)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        zeros = lambda n: torch.zeros(n, device=self.device, dtype=torch.float64)  # noqa: E731
        self.sums, self.streak, self.max_streak, self.window = zeros(3), zeros(()), zeros(()), zeros(2)
        self.images = 0

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        safe = torch.where(finite, loss, torch.zeros_like(loss))
        self.sums += torch.stack([safe * batch_size, finite * float(batch_size), (~finite).double()])
        self.window += torch.stack([safe, finite.double()])
        self.streak = (self.streak + 1) * (~finite)
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        self.images += batch_size

    def state_dict(self) -> Dict:
        return {"sums": self.sums.cpu(), "streak": self.streak.cpu(), "max_streak": self.max_streak.cpu(),
                "window": self.window.cpu(), "images": self.images}

    def load_state_dict(self, state: Dict) -> None:
        for key in ("sums", "streak", "max_streak", "window"):
            setattr(self, key, state[key].to(self.device))
        self.images = state["images"]


@dataclass
class EpochStats:
    loss: float  # mean training loss over all ranks' images with a finite loss
    images: int  # images trained on, all ranks
    nonfinite_steps: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class Trainer:
    """One optimizer step at a time, and the totals of the current epoch."""

    model: nn.Module  # what is trained and saved
    train_model: nn.Module  # the same model, maybe wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Callable[[int], float]
    criterion: nn.Module
    normalize: Callable[[torch.Tensor], torch.Tensor]
    amp: str
    augment: Optional[Callable] = None  # (inputs, targets) -> (inputs, targets) on the device: erasing, mixup
    ema: Optional[ModelEmaV3] = None  # moving average of the weights, updated after every step
    step: int = 0  # optimizer steps taken (skipped ones included) since the run began
    lr: float = 0.0
    totals: EpochTotals = field(init=False)

    def __post_init__(self):
        self.device = next(self.model.parameters()).device
        self.totals = EpochTotals(self.device)

    def train_step(self, batch: Batch) -> None:
        self.step += 1
        self.lr = self.schedule(self.step)
        set_lr(self.optimizer, self.lr)
        inputs = self.normalize(batch.images)
        targets = batch.targets.to(self.device, non_blocking=True)
        if self.augment is not None:
            inputs, targets = self.augment(inputs, targets)
        with autocast(self.device, self.amp):
            loss = self.criterion(self.train_model(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # skipped on the device if any gradient is inf/NaN
        self.scaler.update(None if self.amp == "fp16" else 1.0)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)  # step 1 copies the weights, as in timm's train.py
        self.totals.add(loss, targets.shape[0])

    def read_window_loss(self) -> float:
        """Mean loss of this rank since the last call (waits for the device)."""
        loss_sum, steps = self.totals.window.tolist()
        self.totals.window.zero_()
        return loss_sum / steps if steps else float("nan")

    def check_numerics(self, max_nonfinite_steps: int) -> None:
        """Stop when any rank saw too many non-finite losses in a row (a collective)."""
        longest = self.totals.max_streak.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        if longest.item() >= max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was not finite for {int(longest.item())} steps in a row (up to step {self.step}); "
                f"those steps were skipped and the run stops here, leaving the last checkpoint as it was. "
                f"Try a lower optim.lr; with runtime.amp=fp16, try bf16 or none"
            )

    def finish_epoch(self, seconds: float) -> EpochStats:
        totals = all_reduce_sum(torch.cat([self.totals.sums,
                                           torch.tensor([float(self.totals.images)], device=self.device,
                                                        dtype=torch.float64)]))
        loss_sum, counted, nonfinite, images = totals.tolist()
        self.totals.reset()
        return EpochStats(loss=loss_sum / counted if counted else float("nan"), images=int(images),
                          nonfinite_steps=int(nonfinite), seconds=seconds)

    def weights_are_finite(self) -> bool:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all())


@dataclass
class EvalResult:
    top1: float  # percent, as timm reports it
    top5: float
    loss: float  # plain cross-entropy, no label smoothing
    images: int  # images evaluated (all ranks)
    unreadable: int  # images that could not be decoded, left out of the figures above
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
def evaluate(
    model: nn.Module,
    loader,
    dataset_size: int,
    num_classes: int,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    amp: str,
    on_unreadable: Callable[[int, str], None] = lambda index, reason: None,
    progress: Callable = lambda iterable: iterable,
    keep_logits: bool = False,
) -> EvalResult:
    """Evaluate this rank's share, then gather every rank's predictions.

    Each image is counted exactly once: the gathered dataset indices (evaluated plus
    unreadable) must be 0..N-1 with no gaps and no repeats, or the evaluation is wrong.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    k = min(5, num_classes)
    indices, topk, targets, unreadable, kept_logits = [], [], [], [], []
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    start = time.perf_counter()
    for batch in progress(loader):
        for index, reason in batch.unreadable:
            on_unreadable(index, reason)
            unreadable.append(index)
        if not len(batch.targets):
            continue
        batch_targets = batch.targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(normalize(batch.images))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, batch_targets, reduction="sum").double()
        topk.append(logits.topk(k, dim=1).indices.cpu())
        targets.append(batch.targets)
        indices.append(batch.indices)
        if keep_logits:
            kept_logits.append(logits.cpu())
    seconds = time.perf_counter() - start
    model.train(was_training)
    cat = lambda parts, *shape: torch.cat(parts) if parts else torch.empty(0, *shape, dtype=torch.long)  # noqa: E731
    logits_part = torch.cat(kept_logits) if kept_logits else torch.empty(0, num_classes)
    gathered = all_gather_objects((cat(indices), cat(topk, k), cat(targets), unreadable, logits_part))
    order = torch.cat([g[0] for g in gathered])
    every = torch.cat([order, torch.tensor([i for g in gathered for i in g[3]], dtype=torch.long)])
    if every.numel() != dataset_size or not torch.equal(every.sort().values, torch.arange(dataset_size)):
        raise RuntimeError(f"evaluation covered {every.numel()} images with gaps or repeats; expected each of {dataset_size} once")
    ascending = order.argsort()
    predictions = torch.cat([g[1] for g in gathered])[ascending]
    all_targets = torch.cat([g[2] for g in gathered])[ascending]
    loss_total = all_reduce_sum(loss_sum).item()
    hits = predictions == all_targets[:, None]
    evaluated = len(all_targets)
    return EvalResult(
        top1=100.0 * hits[:, 0].double().mean().item() if evaluated else 0.0,
        top5=100.0 * hits.any(dim=1).double().mean().item() if evaluated else 0.0,
        loss=loss_total / max(evaluated, 1),
        images=evaluated,
        unreadable=dataset_size - evaluated,
        seconds=seconds,
        predictions=predictions,
        targets=all_targets,
        indices=order[ascending],
        logits=torch.cat([g[4] for g in gathered])[ascending] if keep_logits else None,
    )
