"""CSPResNet-50, the same network as timm's `cspresnet50`: same module names (so timm's weights load
with strict=True), same construction order (so a seed gives the same initial weights), same forward."""
from collections import OrderedDict
from typing import Sequence

import torch
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates
from torch import nn

STAGE_DEPTHS = (3, 3, 5, 2)
STAGE_CHANNELS = (128, 256, 512, 1024)
STEM_CHANNELS = 64


class ConvBnAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional LeakyReLU(0.01); timm's ConvNormAct."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.LeakyReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (no activation), residual add, then the activation."""

    def __init__(self, channels: int, drop_path: float):
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvBnAct(channels, mid, 1)
        self.conv2 = ConvBnAct(mid, mid, 3)
        self.conv3 = ConvBnAct(mid, channels, 1, act=False)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.act3 = nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.act3(self.drop_path(out) + x)


class CrossStage(nn.Module):
    """Expand to 2x channels, run the blocks on one half, merge the halves with a 1x1 conv (the first
    half crossing the stage untouched is the "cross stage partial" idea)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_path_rates: Sequence[float]):
        super().__init__()
        # timm keeps the input width in the downsampling conv (down_growth=False).
        self.conv_down = ConvBnAct(in_chs, in_chs, 3, stride) if stride != 1 else nn.Identity()
        self.conv_exp = ConvBnAct(in_chs, 2 * out_chs, 1, act=False)  # cross_linear=True in timm
        self.blocks = nn.Sequential(*[Bottleneck(out_chs, rate) for rate in drop_path_rates])
        self.conv_transition_b = ConvBnAct(out_chs, out_chs, 1)
        self.conv_transition = ConvBnAct(2 * out_chs, out_chs, 1)
        self.half = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(self.conv_down(x))
        cross, through = x.split(self.half, dim=1)
        through = self.conv_transition_b(self.blocks(through)).contiguous()
        return self.conv_transition(torch.cat([cross, through], dim=1))


class CSPResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0, in_chans: int = 3):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(OrderedDict(conv1=ConvBnAct(in_chans, STEM_CHANNELS, 7, stride=2),
                                              pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
        # Linear 0 -> drop_path_rate over all 13 blocks, grouped per stage, as timm does.
        rates = calculate_drop_path_rates(drop_path_rate, list(STAGE_DEPTHS), stagewise=True)
        inputs = (STEM_CHANNELS, *STAGE_CHANNELS[:-1])
        self.stages = nn.Sequential(*[CrossStage(in_chs, out_chs, stride=2 if index else 1, drop_path_rates=stage_rates)
                                      for index, (in_chs, out_chs, stage_rates)
                                      in enumerate(zip(inputs, STAGE_CHANNELS, rates))])
        # "fast" pooling is x.mean((2, 3)), then dropout, then head.fc
        self.head = ClassifierHead(STAGE_CHANNELS[-1], num_classes, pool_type="fast", drop_rate=drop_rate)
        self.backbone_frozen = False
        # timm's init, in registration order; each block's last BN gamma is zeroed: every block starts as the identity
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Bottleneck):
                nn.init.zeros_(module.conv3.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def freeze_backbone(self) -> None:
        """A linear probe: no gradients (an optimizer built afterwards leaves the backbone out) and eval mode
        (BatchNorm statistics kept, drop-path off), so the classifier learns on the loaded weights' features."""
        self.backbone_frozen = True
        self.stem.requires_grad_(False)
        self.stages.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "CSPResNet50":
        super().train(mode)
        if self.backbone_frozen:
            self.stem.eval()
            self.stages.eval()
        return self


def build_model(num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> CSPResNet50:
    return CSPResNet50(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
