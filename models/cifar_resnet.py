"""ResNets for 32x32 CIFAR images built from BasicBlocks.

Two published variants share this code:
- ``resnet20``: He et al. 2015 ("Deep Residual Learning", section 4.2): 3 stages x 3 blocks of
  16/32/64 channels; the shortcut that halves the resolution is the paper's option A (subsample and
  zero-pad the channels), so it has no parameters: 0.27M in total.
- ``resnet18``: the widely used CIFAR adaptation of the ImageNet ResNet-18: 3x3 stem of stride 1, no
  max-pool, 4 stages x 2 blocks of 64-512 channels, 1x1 conv + BN projection shortcuts: 11.2M.

Every activation is an ``nn.ReLU`` module (one per use, never the functional form) so that
module hooks, such as the activation compressor's, see each of them under its own name.
"""
from __future__ import annotations

import torch
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and append zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # F.pad's last pair pads dim 1 (channels): the new channels go after the old ones
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "zero_pad":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem (stride 1, no max-pool), stages of BasicBlocks, global average pool, linear head."""

    def __init__(self, widths: list[int], blocks_per_stage: list[int], num_classes: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = widths[0]
        for stage_index, (width, num_blocks) in enumerate(zip(widths, blocks_per_stage)):
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride, shortcut))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def he_init(model: nn.Module) -> None:
    """He initialisation for convs, unit BN, as in the ResNet papers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([16, 32, 64], [3, 3, 3], num_classes, shortcut="zero_pad")


def resnet18(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, shortcut="projection")
