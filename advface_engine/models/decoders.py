"""Decoder families, used as shadow models S and as attacker networks R: (B, D) -> (B, 3, H, W) in [-1, 1].

Each is an ``nn.Sequential`` of standard modules (plus ``DenseBlock`` for NbNet) so that a
backend can walk it layer by layer. All start with a Linear layer from the feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": lambda c: nn.ReLU(),
    "leaky_relu": lambda c: nn.LeakyReLU(0.2),
    "prelu": lambda c: nn.PReLU(c),
}
HEADS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}
MODES = ("nearest", "bilinear")  # UpConvDecoder's upsampling


def upsampling_plan(size: int, max_start: int = 8) -> tuple[int, int]:
    """(start side, number of 2x upsamplings) with start * 2**n == size and start <= max_start."""
    if size < 4:
        raise ValueError(f"output size must be >= 4, got {size}")
    side, n = size, 0
    while side > max_start:
        if side % 2:
            raise ValueError(f"output size {size} must be (4..8) * 2**n, e.g. 32, 56, 64, 112")
        side, n = side // 2, n + 1
    return side, n


def _channels(width: int, n_up: int, i: int) -> int:
    return min(width * 2 ** (n_up - i), 512)


def _stem(feature_dim: int, channels: int, side: int, act: str) -> list[nn.Module]:
    return [
        nn.Linear(feature_dim, channels * side * side),
        nn.Unflatten(1, (channels, side, side)),
        nn.BatchNorm2d(channels),
        ACTIVATIONS[act](channels),
    ]


class DCGANDecoder(nn.Sequential):
    """Linear, then (ConvTranspose 4x4/2, BN, act) per doubling, then Conv 3x3 to RGB and the head."""

    def __init__(self, feature_dim: int = 512, size: int = 112, width: int = 32, act: str = "relu", head: str = "tanh"):
        side, n_up = upsampling_plan(size)
        layers = _stem(feature_dim, _channels(width, n_up, 0), side, act)
        for i in range(n_up):
            cin, cout = _channels(width, n_up, i), _channels(width, n_up, i + 1)
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), ACTIVATIONS[act](cout)]
        layers += [nn.Conv2d(_channels(width, n_up, n_up), 3, 3, 1, 1), HEADS[head]()]
        super().__init__(*layers)


class DenseBlock(nn.Module):
    """NbNet's dense block: each (BN, act, Conv 3x3) layer sees the concatenation of all before it."""

    def __init__(self, channels: int, growth: int, n_layers: int, act: str = "relu"):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(channels + i * growth), ACTIVATIONS[act](channels + i * growth),
                          nn.Conv2d(channels + i * growth, growth, 3, 1, 1, bias=False))
            for i in range(n_layers)
        )
        self.out_channels = channels + n_layers * growth

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


class NbNetDecoder(nn.Sequential):
    """NbNet-style: per doubling a ConvTranspose, a dense block and a 1x1 transition conv."""

    def __init__(self, feature_dim: int = 512, size: int = 112, width: int = 32, growth: int = 8, n_layers: int = 2,
                 act: str = "relu", head: str = "tanh"):
        side, n_up = upsampling_plan(size)
        layers = _stem(feature_dim, _channels(width, n_up, 0), side, act)
        for i in range(n_up):
            cin, cout = _channels(width, n_up, i), _channels(width, n_up, i + 1)
            block = DenseBlock(cout, growth, n_layers, act)
            layers += [
                nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), ACTIVATIONS[act](cout),
                block, nn.Conv2d(block.out_channels, cout, 1, bias=False), nn.BatchNorm2d(cout), ACTIVATIONS[act](cout),
            ]
        layers += [nn.Conv2d(_channels(width, n_up, n_up), 3, 3, 1, 1), HEADS[head]()]
        super().__init__(*layers)


class UpConvDecoder(nn.Sequential):
    """Upsample (nearest or bilinear) + Conv 3x3 + BN + act per doubling: no checkerboard artefacts."""

    def __init__(self, feature_dim: int = 512, size: int = 112, width: int = 32, mode: str = "nearest",
                 act: str = "leaky_relu", head: str = "tanh"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        side, n_up = upsampling_plan(size)
        layers = _stem(feature_dim, _channels(width, n_up, 0), side, act)
        for i in range(n_up):
            cin, cout = _channels(width, n_up, i), _channels(width, n_up, i + 1)
            corners = {"align_corners": False} if mode == "bilinear" else {}
            layers += [nn.Upsample(scale_factor=2, mode=mode, **corners), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(cout), ACTIVATIONS[act](cout)]
        layers += [nn.Conv2d(_channels(width, n_up, n_up), 3, 3, 1, 1), HEADS[head]()]
        super().__init__(*layers)
