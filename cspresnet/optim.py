"""The optimizer and the learning-rate schedule of a recipe."""
from dataclasses import dataclass
from typing import List

import torch
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


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD, fused: one kernel for all tensors, and it takes the GradScaler's inf/NaN flag on
    the device, so a non-finite step is skipped without a host sync."""
    o = recipe.optim
    groups = parameter_groups(model, o.weight_decay, o.decay_norm_and_bias)
    optimizer = torch.optim.SGD(groups, lr=recipe.scaled_lr(), momentum=o.momentum, nesterov=o.nesterov, fused=True)
    if o.momentum > 0:
        # Fused SGD allocates the buffers uninitialised on its first step and leaves them so
        # if that step is skipped (torch 2.14). Zeros give the same first update (buffer = grad).
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

    def __call__(self, step: int) -> float:
        if step < self.burn_in:
            return self.base_lr * (step / self.burn_in) ** self.power
        return self.base_lr * max(0.0, 1.0 - step / self.total) ** self.power


def build_schedule(recipe: Recipe, steps_per_epoch: int) -> DarknetPolySchedule:
    return DarknetPolySchedule(
        base_lr=recipe.scaled_lr(),
        burn_in=recipe.burn_in_steps(),
        total=recipe.epochs * steps_per_epoch,
        power=recipe.schedule.power,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
