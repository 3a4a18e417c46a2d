"""One epoch of training and one pass of evaluation; everything else is wiring in train.py."""
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .distributed import all_gather_objects, all_reduce_sum
from .optim import set_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EpochStats:
    loss: float  # mean training loss over all ranks' images
    images: int  # images trained on, all ranks
    seconds: float
    lr: float  # the last learning rate used
    step: int  # optimizer steps done since the start of the run

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def train_one_epoch(
    model: nn.Module,
    loader,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    amp: str,
    step: int,
    log_interval: int,
    on_log: Optional[Callable[[int, float, float], None]] = None,
    show_progress: bool = False,
    description: str = "train",
) -> EpochStats:
    """Train on every batch of `loader`. `step` is the number of updates done before this epoch.

    The loss stays on the device and is read every `log_interval` steps only: each read
    waits for the GPU, so reading it every step would stall the pipeline.
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    window_sum = torch.zeros((), device=device, dtype=torch.float64)
    images, window_steps, lr = 0, 0, 0.0
    start = time.perf_counter()
    for batch, targets in tqdm(loader, desc=description, disable=None if show_progress else True, leave=False, dynamic_ncols=True):
        step += 1
        lr = schedule(step)
        set_lr(optimizer, lr)
        inputs = normalize(batch)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = criterion(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        detached = loss.detach().double()
        loss_sum += detached * targets.shape[0]
        window_sum += detached
        images += targets.shape[0]
        window_steps += 1
        if window_steps == log_interval:
            if on_log is not None:
                on_log(step, window_sum.item() / window_steps, lr)
            window_sum.zero_()
            window_steps = 0
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(images), device=device, dtype=torch.float64)]))
    seconds = time.perf_counter() - start
    return EpochStats(loss=(totals[0] / totals[1]).item(), images=int(totals[1].item()), seconds=seconds, lr=lr, step=step)


@dataclass
class EvalResult:
    top1: float  # percent, as timm reports it
    top5: float
    loss: float  # plain cross-entropy, no label smoothing
    images: int
    seconds: float
    predictions: torch.Tensor  # (images, 5) top-5 class ids, in dataset order
    targets: torch.Tensor  # (images,)

    def per_class_top1(self, num_classes: int) -> List[float]:
        correct = (self.predictions[:, 0] == self.targets).double()
        hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, self.targets, correct)
        counts = torch.bincount(self.targets, minlength=num_classes).double()
        return (100.0 * hits / counts.clamp(min=1)).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    indices: List[int],
    dataset_size: int,
    num_classes: int,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    amp: str,
    show_progress: bool = False,
) -> EvalResult:
    """Evaluate this rank's share, then gather every rank's predictions.

    Each image is counted exactly once: the gathered dataset indices must be 0..N-1 with
    no gaps and no repeats, or the evaluation is wrong and we stop.
    """
    model.eval()
    device = next(model.parameters()).device
    top5_parts, target_parts = [], []
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    start = time.perf_counter()
    for batch, targets in tqdm(loader, desc="eval", disable=None if show_progress else True, leave=False, dynamic_ncols=True):
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(normalize(batch))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        top5_parts.append(logits.topk(min(5, num_classes), dim=1).indices.cpu())
        target_parts.append(targets.cpu())
    seconds = time.perf_counter() - start
    num_top = min(5, num_classes)
    mine = (
        torch.tensor(indices, dtype=torch.long),
        torch.cat(top5_parts) if top5_parts else torch.empty(0, num_top, dtype=torch.long),
        torch.cat(target_parts) if target_parts else torch.empty(0, dtype=torch.long),
    )
    gathered = all_gather_objects(mine)
    order = torch.cat([g[0] for g in gathered])
    if order.numel() != dataset_size or not torch.equal(order.sort().values, torch.arange(dataset_size)):
        raise RuntimeError(f"evaluation covered {order.numel()} images with gaps or repeats; expected each of {dataset_size} once")
    predictions = torch.empty(dataset_size, num_top, dtype=torch.long)
    predictions[order] = torch.cat([g[1] for g in gathered])
    targets_all = torch.empty(dataset_size, dtype=torch.long)
    targets_all[order] = torch.cat([g[2] for g in gathered])
    loss_total = all_reduce_sum(loss_sum).item()

    hits = predictions == targets_all[:, None]
    return EvalResult(
        top1=100.0 * hits[:, 0].double().mean().item(),
        top5=100.0 * hits.any(dim=1).double().mean().item(),
        loss=loss_total / dataset_size,
        images=dataset_size,
        seconds=seconds,
        predictions=predictions,
        targets=targets_all,
    )

