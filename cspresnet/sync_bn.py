"""SyncBatchNorm over groups of processes (8 GPUs x 16 images normalise over pairs = 32, as darknet did): torch's
on GPUs; on a CPU, which torch's refuses, differentiable all-reduces of per-channel sums (docs/training.md)."""
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


class SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: each process's input feeds every process's output,
    so its gradient is the sum of all their output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """Statistics pooled over a process group; not a subclass of torch's SyncBatchNorm, which DDP refuses on a CPU."""

    def __init__(self, bn: nn.BatchNorm2d, group: Optional[dist.ProcessGroup]):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            self.weight, self.bias = bn.weight, bn.bias  # the same tensors: an optimizer built before holds them
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self.process_group = group
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        # two passes over the data (the mean, then the centred squares) for float accuracy
        group = self.process_group or dist.group.WORLD
        factor = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as BatchNorm's momentum=None
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        totals = SumOverGroup.apply(torch.cat([x.sum(dims), count]), group)
        images = totals[-1].detach()
        mean = totals[:-1] / images
        centred = x - mean.view(shape)
        var = SumOverGroup.apply((centred * centred).sum(dims), group) / images
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * images / (images - 1), factor)  # unbiased, as BatchNorm
        return out


def convert_to_sync_bn(model: nn.Module, group_size: int, world_size: int, device: torch.device) -> nn.Module:
    """Every BatchNorm as a SyncBatchNorm over this process's group of `group_size` consecutive ranks
    (all ranks call this together: each creates every group), keeping the parameters and buffers."""
    group = dist.new_subgroups(group_size)[0] if group_size != world_size else None  # None: the whole world
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    return to_cpu_sync_bn(model, group)


def to_cpu_sync_bn(module: nn.Module, group: Optional[dist.ProcessGroup]) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d):
        return CpuSyncBatchNorm(module, group)
    for name, child in module.named_children():
        module.add_module(name, to_cpu_sync_bn(child, group))
    return module
