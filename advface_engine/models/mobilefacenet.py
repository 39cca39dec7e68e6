"""A small MobileFaceNet-style encoder (depthwise-separable bottlenecks, GDC head) for CPU work."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Expand (1x1) - depthwise (3x3) - project (1x1), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 2):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> features (B, num_features). ``width`` scales channels."""

    def __init__(self, num_features: int = 128, input_size: int = 112, width: int = 32):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.input_size = input_size
        w = width
        self.stem = nn.Sequential(_conv_bn(3, w, 3, 2), _conv_bn(w, w, 3, 1, groups=w))
        self.blocks = nn.Sequential(
            Bottleneck(w, 2 * w, 2), Bottleneck(2 * w, 2 * w, 1),
            Bottleneck(2 * w, 4 * w, 2), Bottleneck(4 * w, 4 * w, 1),
            Bottleneck(4 * w, 4 * w, 2), Bottleneck(4 * w, 4 * w, 1),
        )
        side = input_size // 16
        self.head = nn.Sequential(
            _conv_bn(4 * w, 8 * w, 1),
            _conv_bn(8 * w, 8 * w, side, 1, groups=8 * w, act=False),  # global depthwise conv (GDC)
        )
        self.head[1][0].padding = (0, 0)
        self.fc = nn.Linear(8 * w, num_features, bias=False)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x))).flatten(1)
        return self.features(self.fc(x))
