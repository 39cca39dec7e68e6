"""Encoders E (images -> features) and decoders S / R (features -> images), by architecture name."""

from __future__ import annotations

from torch import nn

from .decoders import DCGANDecoder, DenseBlock, NbNetDecoder, UpConvDecoder
from .io import load_model, save_model
from .iresnet import IResNet, iresnet
from .mobilefacenet import MobileFaceNet

DECODERS = {"dcgan": DCGANDecoder, "nbnet": NbNetDecoder, "upconv": UpConvDecoder}
ENCODERS = {
    "iresnet18": lambda **kw: iresnet(18, **kw),
    "iresnet34": lambda **kw: iresnet(34, **kw),
    "iresnet50": lambda **kw: iresnet(50, **kw),
    "iresnet100": lambda **kw: iresnet(100, **kw),
    "mobilefacenet": MobileFaceNet,
}
ARCHITECTURES = {**DECODERS, **ENCODERS}


def build_model(arch: str, **kwargs) -> nn.Module:
    """Build architecture ``arch``; the name and kwargs are kept so ``save_model`` can record them."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[arch](**kwargs)
    model.arch, model.arch_kwargs = arch, dict(kwargs)
    return model


__all__ = [
    "ARCHITECTURES", "DECODERS", "ENCODERS", "DCGANDecoder", "DenseBlock", "IResNet", "MobileFaceNet",
    "NbNetDecoder", "UpConvDecoder", "build_model", "iresnet", "load_model", "save_model",
]
