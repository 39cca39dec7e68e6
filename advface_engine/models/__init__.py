"""Encoders E (images -> features) and decoders S / R (features -> images), by architecture name."""

from __future__ import annotations

import inspect
import numbers

from torch import nn

from ..errors import IncompatibleCheckpointError
from .decoders import ACTIVATIONS, HEADS, MODES, DCGANDecoder, DenseBlock, NbNetDecoder, UpConvDecoder
from .io import NotACheckpoint, load_model, save_model
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
# Inclusive bounds of the integer architecture arguments (docs/api.md, Models and checkpoints): far above any
# face model, and low enough that a checkpoint's header cannot ask for an absurd model.
ARGUMENT_BOUNDS = {"feature_dim": (1, 8192), "num_features": (1, 8192), "size": (4, 1024), "input_size": (16, 1024),
                   "width": (1, 512), "growth": (1, 256), "n_layers": (0, 32)}
ARGUMENT_CHOICES = {"act": tuple(ACTIVATIONS), "head": tuple(HEADS), "mode": MODES}


def check_arguments(arch: str, kwargs: dict) -> None:
    """Refuse an unknown architecture, an argument it does not take, and values outside ``ARGUMENT_BOUNDS``
    and ``ARGUMENT_CHOICES``: a checkpoint's header names them, and a model is built from them."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    factory = IResNet if arch.startswith("iresnet") else ARCHITECTURES[arch]
    names = [n for n in inspect.signature(factory).parameters if n != "layers"]  # iresnetN fixes its layers
    for name, value in kwargs.items():
        if name not in names:
            raise ValueError(f"{arch} takes no argument {name!r} (its arguments: {', '.join(names)})")
        if name in ARGUMENT_BOUNDS:
            low, high = ARGUMENT_BOUNDS[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
                raise ValueError(f"{arch} argument {name}={value!r} is out of bounds: an integer from {low} to {high}")
        elif name in ARGUMENT_CHOICES and (not isinstance(value, str) or value not in ARGUMENT_CHOICES[name]):
            raise ValueError(f"{arch} argument {name}={value!r} must be one of {ARGUMENT_CHOICES[name]}")
        elif name == "dropout" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                    or not 0 <= value < 1):
            raise ValueError(f"{arch} argument dropout={value!r} must be a number in [0, 1)")


def build_model(arch: str, **kwargs) -> nn.Module:
    """Build architecture ``arch`` (arguments checked by ``check_arguments``); the name and kwargs are kept so
    ``save_model`` can record them."""
    check_arguments(arch, kwargs)
    model = ARCHITECTURES[arch](**kwargs)
    model.arch, model.arch_kwargs = arch, dict(kwargs)
    return model


def load_encoder(path, arch: str | None = None, device="cpu", *, channel_order: str = "rgb", mean=127.5,
                 std=127.5, input_size: int | None = None, **kwargs) -> nn.Module:
    """An encoder from an advface checkpoint (.safetensors), an ONNX file (.onnx), or a user's
    ArcFace state dict (.pth/.pt/.safetensors without header) given ``arch`` (e.g. "iresnet50") and its
    arguments (``input_size`` and ``kwargs``).

    An ONNX model takes its own preprocessing (``OnnxEncoder``): ``channel_order`` "rgb" or "bgr", and
    ``mean`` and ``std`` on pixel values 0..255 (numbers, or three per channel), insightface's ArcFace
    convention by default; ``input_size``: the image side it takes (None: the graph's). Every other
    file refuses them, and an ONNX file refuses architecture arguments."""
    from pathlib import Path

    from .io import load_state_dict_file, read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no encoder file at {path}")
    preprocessing = {"channel_order": channel_order, "mean": mean, "std": std}
    if path.suffix == ".onnx":
        from .onnx_encoder import OnnxEncoder

        if arch is not None:
            raise ValueError(f"{path}: an ONNX encoder records its own architecture: drop --encoder-arch (arch=)")
        if kwargs:
            raise ValueError(f"{path}: an ONNX encoder takes channel_order, mean, std and input_size, not "
                             f"{sorted(kwargs)}")
        return OnnxEncoder(path, **preprocessing, input_size=input_size)
    from .onnx_encoder import DEFAULT_PREPROCESSING

    changed = [f"--encoder-{k.replace('_', '-')} ({k}=)" for k, v in preprocessing.items()
               if not (isinstance(v, (str, numbers.Real)) and v == DEFAULT_PREPROCESSING[k])]
    if changed:
        raise ValueError(f"{path}: {', '.join(changed)} set an ONNX encoder's preprocessing; a torch encoder takes "
                         "the decoders' [-1, 1] RGB images as they are")
    if input_size is not None:
        kwargs["input_size"] = input_size
    if arch is None:
        try:
            meta = read_metadata(path)
        except NotACheckpoint as err:  # a damaged advface header is reported as it is
            raise IncompatibleCheckpointError(
                f"{path} is not an advface checkpoint, so it has no architecture header: for a plain state dict "
                f"pass --encoder-arch (arch=), e.g. iresnet50 ({err})") from err
        if meta["arch"] not in ENCODERS:
            raise IncompatibleCheckpointError(f"{path} holds a {meta['arch']!r} model, not an encoder "
                                              f"({sorted(ENCODERS)})")
        if kwargs:
            raise ValueError(f"{path} records its own architecture arguments; got {sorted(kwargs)} as well")
        return load_model(path, device)
    model = build_model(arch, **kwargs)
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or misshapen weights
        first = str(err).strip().splitlines()
        raise IncompatibleCheckpointError(f"{path} does not hold {arch} weights: {' '.join(first[:3])[:500]}") \
            from err
    return model.to(device).eval()


__all__ = [
    "ARCHITECTURES", "ARGUMENT_BOUNDS", "ARGUMENT_CHOICES", "DECODERS", "ENCODERS", "DCGANDecoder", "DenseBlock",
    "IResNet", "MobileFaceNet", "NbNetDecoder", "UpConvDecoder", "build_model", "check_arguments", "iresnet",
    "load_encoder", "load_model", "save_model",
]
