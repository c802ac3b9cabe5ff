"""A small Vision Transformer for 32x32 CIFAR images (``vit_cifar``).

torchvision's ``VisionTransformer`` (Dosovitskiy et al. 2021) cut to CIFAR's size: 4x4 patches, so
an image is 8 x 8 = 64 tokens plus the class token; 6 pre-norm encoder blocks of width 256, 8 heads,
MLP width 512, no dropout. 3.2M parameters for 10 classes. Its position embedding is built for 32x32
inputs, so the model takes no other size.

Module hooks see its patch embedding (a conv), LayerNorms, the MLPs' Linear layers and the head; the
attention inside ``nn.MultiheadAttention`` runs as functional calls, which they do not see.
"""
from __future__ import annotations

from torch import nn
from torchvision.models import VisionTransformer

IMAGE_SIZE = 32
PATCH_SIZE = 4


def vit_cifar(num_classes: int = 10) -> nn.Module:
    return VisionTransformer(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_layers=6, num_heads=8,
                             hidden_dim=256, mlp_dim=512, dropout=0.0, attention_dropout=0.0,
                             num_classes=num_classes)
