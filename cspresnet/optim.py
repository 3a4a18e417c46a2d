"""The optimizer and the learning-rate schedule of a recipe."""
from dataclasses import dataclass
from typing import Callable, List

import torch
from timm.optim import RMSpropTF
from torch import nn

from .recipe import Recipe


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> List[dict]:
    """Weight decay on conv and linear weights only, as darknet does; BN and biases are 1-D."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


SGD_KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Fused SGD (the default optim.kernel) takes the GradScaler's inf/NaN flag on the device, so a
    non-finite step is skipped without a host sync; the other kernels and RMSpropTF read it on the host."""
    o = recipe.optim
    groups = parameter_groups(model, o.weight_decay, o.decay_norm_and_bias)
    if o.name == "rmsproptf":
        return RMSpropTF(groups, lr=recipe.scaled_lr(), alpha=o.alpha, eps=o.eps, momentum=o.momentum)
    optimizer = torch.optim.SGD(groups, lr=recipe.scaled_lr(), momentum=o.momentum, nesterov=o.nesterov,
                                **SGD_KERNELS[o.kernel])
    if o.momentum > 0:
        # Fused SGD allocates the buffers uninitialised on its first step and leaves them so if that step
        # is skipped (torch 2.14). Zeros give the same first update (buffer = grad), with every kernel.
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


@dataclass(frozen=True)
class DarknetPolySchedule:
    """darknet's burn-in then poly policy, a pure function of the step (so resume-safe). `step` counts
    updates from 1, as darknet's batch number: update 1 uses base * (1/burn_in)^power, update `total` 0."""

    base_lr: float
    burn_in: int
    total: int
    power: float

    @property
    def warmup_steps(self) -> int:
        return self.burn_in

    def __call__(self, step: int) -> float:
        if step < self.burn_in:
            return self.base_lr * (step / self.burn_in) ** self.power
        return self.base_lr * max(0.0, 1.0 - step / self.total) ** self.power


@dataclass(frozen=True)
class WarmupSchedule:
    base_lr: float
    steps_per_epoch: int
    warmup_epochs: float
    warmup_lr: float

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)


@dataclass(frozen=True)
class StepSchedule(WarmupSchedule):
    """timm's StepLRScheduler (warmup_prefix=False, t_in_epochs=False) in optimizer steps: a linear warmup
    from warmup_lr, then a staircase falling by decay_rate every decay_epochs, counted from step 0. Update
    `step` (from 1) gets the rate of t = step - 1, with timm's arithmetic operation for operation, so the
    rates are equal as floats (docs/recipes.md, the RA family)."""

    decay_epochs: float
    decay_rate: float

    def __call__(self, step: int) -> float:
        t = step - 1
        if t < self.warmup_steps:
            return self.warmup_lr + t * ((self.base_lr - self.warmup_lr) / self.warmup_steps)
        decay_steps = self.decay_epochs * self.steps_per_epoch  # a float, as timm gets it
        return self.base_lr * self.decay_rate ** (t // decay_steps)


@dataclass(frozen=True)
class LinearSchedule(WarmupSchedule):
    """FFCV's "cyclic" schedule (ffcv-imagenet train_imagenet.py, get_cyclic_lr): a linear warmup, then
    a straight line down to 0 at the run's end, per update (FFCV interpolates within epochs too)."""

    total: int  # updates in the run

    def __call__(self, step: int) -> float:
        t, warmup = step - 1, self.warmup_steps
        if t < warmup:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * t / warmup
        return self.base_lr * max(0.0, (self.total - t) / max(self.total - warmup, 1))


def build_schedule(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    s, lr, total = recipe.schedule, recipe.scaled_lr(), recipe.epochs * steps_per_epoch
    if s.name == "step":
        return StepSchedule(lr, steps_per_epoch, s.warmup_epochs, s.warmup_lr, s.decay_epochs, s.decay_rate)
    if s.name == "linear":
        return LinearSchedule(lr, steps_per_epoch, s.warmup_epochs, s.warmup_lr, total)
    return DarknetPolySchedule(lr, recipe.burn_in_steps(), total, s.power)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
