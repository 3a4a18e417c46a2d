"""The optimizer and the learning-rate schedule of a recipe."""
from dataclasses import dataclass
from typing import Callable, List

import torch
from timm.optim import RMSpropTF
from torch import nn

from .recipe import Recipe


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> List[dict]:
    """Weight decay on conv and linear weights only, as darknet does; BN and biases are 1-D."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


SGD_KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD is fused by default (optim.kernel): one kernel for all tensors, and it takes the
    GradScaler's inf/NaN flag on the device, so a non-finite step is skipped without a host
    sync. The other kernels, and timm's RMSpropTF, make the GradScaler read that flag on the
    host once per step."""
    o = recipe.optim
    groups = parameter_groups(model, o.weight_decay, o.decay_norm_and_bias)
    if o.name == "rmsproptf":
        return RMSpropTF(groups, lr=recipe.scaled_lr(), alpha=o.alpha, eps=o.eps, momentum=o.momentum)
    optimizer = torch.optim.SGD(groups, lr=recipe.scaled_lr(), momentum=o.momentum, nesterov=o.nesterov,
                                **SGD_KERNELS[o.kernel])
    if o.momentum > 0:
        # Fused SGD allocates the buffers uninitialised on its first step and leaves them so
        # if that step is skipped (torch 2.14). Zeros give the same first update (buffer = grad),
        # with every kernel.
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return optimizer


@dataclass(frozen=True)
class DarknetPolySchedule:
    """darknet's burn-in then poly policy, as a pure function of the step number.

    `step` counts optimizer updates from 1, as darknet's batch number does when it sets the
    rate: update 1 uses base * (1/burn_in)^power; the last update (step == total) uses 0.
    A pure function of the step is resume-safe by construction.
    """

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
class StepSchedule:
    """timm's StepLRScheduler (warmup_prefix=False, t_in_epochs=False) counted in optimizer
    steps, as a pure function of the step: a linear warmup from warmup_lr, then a staircase
    that falls by decay_rate every decay_epochs, counted from step 0 (the warmup only
    overrides its start).

    timm's train.py sets the rate for update `step` (from 1) from t = step - 1 (step_update
    after each update), and so do we. The arithmetic is timm's, operation for operation, so
    the rates are equal as floats: the slope is divided before it is multiplied by t, and
    the staircase floor-divides t by the float decay length. At a t that is a whole multiple
    of a decay length like 16.8 (2.4 epochs of 7 steps) t / decay_steps can round up to the
    whole number while t // decay_steps does not: the step falls one update later, as timm's.
    """

    base_lr: float
    steps_per_epoch: int
    warmup_epochs: float
    warmup_lr: float
    decay_epochs: float
    decay_rate: float

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    @property
    def decay_steps(self) -> float:
        return self.decay_epochs * self.steps_per_epoch  # a float, as timm gets it

    def __call__(self, step: int) -> float:
        t = step - 1
        if t < self.warmup_steps:
            return self.warmup_lr + t * ((self.base_lr - self.warmup_lr) / self.warmup_steps)
        return self.base_lr * self.decay_rate ** (t // self.decay_steps)


@dataclass(frozen=True)
class LinearSchedule:
    """FFCV's "cyclic" schedule (ffcv-imagenet train_imagenet.py, get_cyclic_lr): a linear
    warmup from warmup_lr to the base rate over warmup_epochs, then a straight line down to
    0 at the end of the run, set per update (FFCV interpolates within each epoch too). As a
    pure function of the step, like the others; `t = step - 1` updates done before this one."""

    base_lr: float
    steps_per_epoch: int
    warmup_epochs: float
    warmup_lr: float
    total: int  # updates in the run

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        t, warmup = step - 1, self.warmup_steps
        if t < warmup:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * t / warmup
        return self.base_lr * max(0.0, (self.total - t) / max(self.total - warmup, 1))


def build_schedule(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    s = recipe.schedule
    if s.name == "step":
        return StepSchedule(recipe.scaled_lr(), steps_per_epoch, s.warmup_epochs, s.warmup_lr, s.decay_epochs,
                            s.decay_rate)
    if s.name == "linear":
        return LinearSchedule(recipe.scaled_lr(), steps_per_epoch, s.warmup_epochs, s.warmup_lr,
                              recipe.epochs * steps_per_epoch)
    return DarknetPolySchedule(
        base_lr=recipe.scaled_lr(),
        burn_in=recipe.burn_in_steps(),
        total=recipe.epochs * steps_per_epoch,
        power=recipe.schedule.power,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
