"""An ONNX recognition model as an encoder: AdvFace only runs the encoder forward (for z~ = E(S(z)))."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from .io import file_sha256


class OnnxEncoder(nn.Module):
    """Runs an ONNX model (images (B, 3, H, W) in [-1, 1] -> features (B, D)) with onnxruntime.

    Forward only: gradients never flow through the encoder in AdvFace. Needs the ``onnx`` extra.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("ONNX encoders need onnxruntime: pip install 'advface-engine[onnx]'") from err
        try:
            self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own error types: a file that is not a model it can run
            raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({str(err)[:300]})") from err
        self.source_sha256 = file_sha256(path)  # the module has no parameters: this identifies the model
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.input_size = shape[-1] if isinstance(shape[-1], int) else None

    def forward(self, images: Tensor) -> Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: x})[:1]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(images.device, images.dtype)
