"""Pre-activation bottleneck ResNet for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual
Networks"): ResNet-164 = 3 stages of (164 - 2) / 9 = 18 bottleneck blocks, bottleneck widths
16/32/64, each block expanding 4x (outputs 64/128/256 channels). 1.7M parameters for 10 classes.

A block is BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 added to the identity. Where the
shape changes, a 1x1 projection takes the block's pre-activated input, as in the paper's code.
Every activation is its own ``nn.ReLU`` module so that module hooks see it.
"""
from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import he_init

EXPANSION = 4


class PreActBottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * EXPANSION
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)  # acts on BN's fresh output, never on the block input
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        residual = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + residual


class PreActResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 9 != 0:
            raise ValueError(f"a pre-activation bottleneck ResNet needs depth = 9n + 2, got {depth}")
        blocks_per_stage = (depth - 2) // 9
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        stages = []
        in_channels = widths[0]
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(PreActBottleneck(in_channels, width, stride))
                in_channels = width * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # The last block leaves its output un-activated: the final BN-ReLU completes it.
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.conv1(x))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet164(num_classes: int = 10) -> PreActResNet:
    return PreActResNet(164, num_classes)
