"""Faces from an image folder (one sub-folder per identity) or a numpy array, as tensors in [-1, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def images_from_array(array: np.ndarray, size: int | None = None) -> Tensor:
    """(N, H, W, 3) uint8 or (N, 3, H, W) float array -> (N, 3, size, size) float32 in [-1, 1]."""
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"images must be 4-D (N, H, W, 3) or (N, 3, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        x = torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)
    elif np.issubdtype(array.dtype, np.floating):
        x = torch.from_numpy(array.astype(np.float32))
        if x.numel() and (x.min() < -1.001 or x.max() > 1.001):
            raise ValueError("float images must lie in [-1, 1]")
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}; use uint8 or float")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"images must have 3 channels, got shape {tuple(array.shape)}")
    if size is not None and x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def load_image_folder(root: str | os.PathLike, size: int = 112) -> tuple[Tensor, Tensor, list[str]]:
    """Images of ``root/<identity>/*.png|jpg`` -> (images, labels, identity names), sorted by name."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
                labels.append(label)
    if not images:
        raise ValueError(f"no images found under {root} (expected one sub-folder per identity)")
    return images_from_array(np.stack(images)), torch.tensor(labels), names
