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


def load_encoder(path, arch: str | None = None, device="cpu", **kwargs) -> nn.Module:
    """An encoder from an advface checkpoint (.safetensors), an ONNX file (.onnx), or a user's
    ArcFace state dict (.pth/.pt/.safetensors without header) given ``arch`` (e.g. "iresnet50")."""
    from pathlib import Path

    from .io import load_state_dict_file, read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no encoder file at {path}")
    if path.suffix == ".onnx":
        from .onnx_encoder import OnnxEncoder

        return OnnxEncoder(path)
    if arch is None:
        try:
            meta = read_metadata(path)
        except ValueError as err:
            raise ValueError(f"{path} is not an advface checkpoint, so it has no architecture header: pass arch= "
                             f"(e.g. 'iresnet50') for a plain state dict ({err})") from err
        if meta["arch"] not in ENCODERS:
            raise ValueError(f"{path} holds a {meta['arch']!r} model, not an encoder ({sorted(ENCODERS)})")
        if kwargs:
            raise ValueError(f"{path} records its own architecture arguments; got {sorted(kwargs)} as well")
        return load_model(path, device)
    model = build_model(arch, **kwargs)
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or misshapen weights
        first = str(err).strip().splitlines()
        raise ValueError(f"{path} does not hold {arch} weights: {' '.join(first[:3])[:500]}") from err
    return model.to(device).eval()


__all__ = [
    "ARCHITECTURES", "DECODERS", "ENCODERS", "DCGANDecoder", "DenseBlock", "IResNet", "MobileFaceNet",
    "NbNetDecoder", "UpConvDecoder", "build_model", "iresnet", "load_encoder", "load_model", "save_model",
]
