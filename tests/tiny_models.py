"""Tiny dense models on 8×8 digits, shared by the sparse-training tests."""

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def convnet(seed: int = 0, *, second_stride: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    side = 4 // second_stride
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # (8, 4, 4)
        nn.Conv2d(8, 16, 3, padding=1, stride=second_stride), nn.ReLU(),     # (16, side, side)
        nn.Flatten(), nn.Linear(16 * side * side, 10),
    )
