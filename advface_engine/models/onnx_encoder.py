"""An ONNX recognition model as an encoder: AdvFace only runs the encoder forward (for z~ = E(S(z)))."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelMismatchError
from .io import file_sha256

CHANNEL_ORDERS = ("rgb", "bgr")
# insightface's ArcFace convention: (pixel - 127.5) / 127.5, RGB, so the model sees the decoders' [-1, 1] images
DEFAULT_PREPROCESSING = {"channel_order": "rgb", "mean": 127.5, "std": 127.5}


def _per_channel(name: str, value) -> float | list[float]:
    """A finite number, or three (one per channel, in the model's channel order)."""
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    ok = len(values) in (1, 3) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                       and math.isfinite(v) for v in values)
    if not ok or (name == "std" and any(v == 0 for v in values)):
        what = "nonzero " if name == "std" else ""
        raise ValueError(f"ONNX encoder {name} must be a finite {what}number or three (one per channel), got {value!r}")
    return [float(v) for v in values] if isinstance(value, (list, tuple, np.ndarray)) else float(value)


def _graph_without_unused_inputs(path: str | os.PathLike) -> bytes | None:
    """The model's bytes with graph inputs that no node reads removed, or None when it has none. Some exported
    models keep the inputs of weights they later replaced (quantised copies); onnxruntime would demand them."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path))
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.input if i.name in read]
    if len(keep) == len(model.graph.input):
        return None
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model.SerializeToString()


class OnnxEncoder(nn.Module):
    """Runs an ONNX model (images (B, 3, H, W) in [-1, 1], RGB -> features (B, D)) with onnxruntime.

    The images become the model's input as its exporter expects: pixel values 0..255, in ``channel_order``
    ("rgb" or "bgr"), then ``(pixel - mean) / std`` (numbers, or three per channel in the model's order).
    The defaults are insightface's ArcFace convention. ``input_size``: the image side the model takes (None:
    the graph's, if fixed). A graph with a fixed batch dimension runs in chunks of that size.

    Forward only: gradients never flow through the encoder in AdvFace. Needs the ``onnx`` extra.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, channel_order: str = "rgb",
                 mean=127.5, std=127.5, input_size: int | None = None):
        super().__init__()
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"ONNX encoder channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
        mean, std = _per_channel("mean", mean), _per_channel("std", std)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("ONNX encoders need onnxruntime: pip install 'advface-engine[onnx]'") from err
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not the exporter's layout advice (initializers as inputs)
        try:
            graph = _graph_without_unused_inputs(path)
            self.session = ort.InferenceSession(graph if graph is not None else str(path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnx's and onnxruntime's own error types: a file that is not a model it can run
            raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({str(err)[:300]})") from err
        self.source_sha256 = file_sha256(path)  # the module has no parameters: this (and the preprocessing) is it
        inp = self.session.get_inputs()[0]
        self.input_name, shape = inp.name, inp.shape
        fixed = shape[-1] if len(shape) == 4 and isinstance(shape[-1], int) else None
        if input_size is not None and fixed is not None and input_size != fixed:
            raise ValueError(f"{path}: the graph takes {fixed}x{fixed} images, not input_size {input_size}")
        self.input_size = input_size if input_size is not None else fixed
        self.batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None  # fixed batch
        self.preprocessing = {"channel_order": channel_order, "mean": mean, "std": std}
        # (pixel - mean) / std with pixel = 127.5 (image + 1), as one affine map: exactly the image by default
        mean64, std64 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        self._scale = (127.5 / std64).float().reshape(1, -1, 1, 1)
        self._shift = ((127.5 - mean64) / std64).float().reshape(1, -1, 1, 1)

    def identity(self) -> str:
        """The model file's sha256, joined with the preprocessing when it is not the default (same features,
        same identity)."""
        if self.preprocessing == DEFAULT_PREPROCESSING:
            return self.source_sha256
        record = json.dumps({"sha256": self.source_sha256, **self.preprocessing}, sort_keys=True)
        return hashlib.sha256(record.encode()).hexdigest()

    def forward(self, images: Tensor) -> Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise ModelMismatchError(f"the ONNX encoder takes {self.input_size}x{self.input_size} images, got "
                                     f"{tuple(images.shape[-2:])}")
        x = images.detach().to("cpu", torch.float32)
        if self.preprocessing["channel_order"] == "bgr":
            x = x.flip(1)
        x = (x * self._scale + self._shift).contiguous().numpy()
        step, outs = self.batch or max(len(x), 1), []
        for i in range(0, max(len(x), 1), step):  # an empty batch runs one padded chunk: the output's width
            chunk = x[i:i + step]
            if len(chunk) < step:  # a fixed batch dimension: the last chunk padded, its padding dropped
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *x.shape[1:]), x.dtype)])
            outs.append(np.asarray(self.session.run(None, {self.input_name: chunk})[0], np.float32)[:len(x) - i])
        return torch.from_numpy(np.concatenate(outs)).to(images.device, images.dtype)
