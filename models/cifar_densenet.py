"""DenseNet-121 for 32x32 CIFAR images (Huang et al. 2017, DenseNet-BC): growth rate 32, dense
blocks of [6, 12, 24, 16] bottleneck layers, compression 0.5 in the transitions. As is usual for
CIFAR, the stem is a single 3x3 conv (2 x growth = 64 channels) with no max-pool, so the four blocks
run at 32, 16, 8 and 4 pixels. About 7.0M parameters for 10 classes.

Every activation is its own ``nn.ReLU`` module so that module hooks see it.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4 x growth) then BN-ReLU-conv3x3 (growth); output is appended to the input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_factor: int = 4):
        super().__init__()
        inner = bottleneck_factor * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new_features = self.conv1(self.relu1(self.bn1(x)))
        new_features = self.conv2(self.relu2(self.bn2(new_features)))
        return torch.cat([x, new_features], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compressing the channels) then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2),
        )


class CifarDenseNet(nn.Module):
    def __init__(self, block_sizes: list[int], growth_rate: int, num_classes: int, compression: float = 0.5):
        super().__init__()
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages = []
        for index, num_layers in enumerate(block_sizes):
            for _ in range(num_layers):
                stages.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            if index < len(block_sizes) - 1:
                out_channels = int(math.floor(channels * compression))
                stages.append(Transition(channels, out_channels))
                channels = out_channels
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def densenet121(num_classes: int = 10) -> CifarDenseNet:
    return CifarDenseNet([6, 12, 24, 16], growth_rate=32, num_classes=num_classes)
