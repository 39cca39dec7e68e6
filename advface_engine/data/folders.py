"""Faces from an image folder (one sub-folder per identity) or a numpy array, as tensors in [-1, 1]."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import RefusedFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # what PIL may decode: no format that runs a helper program
MAX_IMAGE_PIXELS = 4096 * 4096  # far above any face crop; a larger image is refused before it is decoded


@contextmanager
def open_image(source, name) -> Iterator:
    """A PIL image of ``source`` (a path or a file object) opened lazily: only its header is read. A file
    that is no image of IMAGE_FORMATS, or whose header names more than MAX_IMAGE_PIXELS pixels, is a
    ``RefusedFileError`` naming ``name``, before anything is decoded (a small file can decode into gigabytes)."""
    from PIL import Image

    try:
        image = Image.open(source, formats=IMAGE_FORMATS)
    except Exception as err:  # PIL raises many types for a file that is not an image it may read
        raise RefusedFileError(f"{name}: not a readable image ({err})") from err
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise RefusedFileError(f"{name}: an image of {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                   "pixels allowed; refused before decoding")
        yield image


def read_image(source, size: int | None, name) -> np.ndarray:
    """``source`` (see ``open_image``) decoded as (size, size, 3) uint8 RGB, or at its own size when ``size``
    is None. It is resized as it is decoded (a JPEG is decoded at the smallest scale that still covers
    ``size``), so only the bounded image itself is ever held at full size."""
    from PIL import Image

    with open_image(source, name) as image:
        try:
            if size is None:
                return np.asarray(image.convert("RGB"))
            image.draft("RGB", (size, size))
            return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
        except Exception as err:  # PIL raises many types for damaged image data
            raise RefusedFileError(f"{name}: not a readable image ({err})") from err


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


class ImageFolder:
    """Faces of ``root/<identity>/*.png|jpg`` read when a batch needs them, so a training set can be
    larger than memory. Identities and files are sorted by name; ``labels[i]`` is image i's identity."""

    def __init__(self, root: str | os.PathLike, size: int = 112, threads: int = 8):
        self.root, self.size, self.threads = Path(root), size, threads
        if not self.root.is_dir():
            raise FileNotFoundError(f"no image folder at {self.root}")
        self.names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.paths: list[Path] = []
        labels = []
        for label, name in enumerate(self.names):
            files = sorted(p for p in (self.root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.paths += files
            labels += [label] * len(files)
        if not self.paths:
            raise ValueError(f"no images found under {self.root} (expected one sub-folder per identity)")
        self.labels = torch.tensor(labels)
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: Path) -> np.ndarray:
        return read_image(path, self.size, path)

    def batch(self, indices) -> Tensor:
        """Images ``indices`` as (B, 3, size, size) float32 in [-1, 1], decoded in threads."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="advface-images")
        arrays = list(self._pool.map(self._read, [self.paths[int(i)] for i in indices]))
        if not arrays:
            return torch.zeros(0, 3, self.size, self.size)
        return images_from_array(np.stack(arrays))

    def fingerprint(self) -> str:
        """sha256 of the file list (relative path, byte size, identity) and the image size: what a
        training checkpoint was written for, without reading every image again."""
        digest = hashlib.sha256(f"size {self.size}\n".encode())
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            digest.update(f"{path.relative_to(self.root)}\t{path.stat().st_size}\t{label}\n".encode())
        return digest.hexdigest()


class NpyImages:
    """An ``.npy`` image array (as ``images_from_array`` takes) memory-mapped: batches are
    converted when needed, so the array can be larger than memory."""

    def __init__(self, path: str | os.PathLike, size: int | None = None):
        self.path, self.size = Path(path), size
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if self.array.ndim != 4:
            raise ValueError(f"{self.path}: images must be 4-D (N, H, W, 3) or (N, 3, H, W), got {self.array.shape}")

    def __len__(self) -> int:
        return len(self.array)

    def batch(self, indices) -> Tensor:
        return images_from_array(self.array[np.asarray(indices, dtype=np.int64)], self.size)

    def fingerprint(self) -> str:
        """The array file's sha256 and the image size."""
        from ..models.io import file_sha256

        return f"size {self.size}: {file_sha256(self.path)}"


def take(images, indices) -> Tensor:
    """Images ``indices`` of a tensor, an ``ImageFolder`` or ``NpyImages``, as a float tensor."""
    if isinstance(images, Tensor):
        if isinstance(indices, range) and indices.step == 1:
            return images[indices.start:indices.stop]  # a view, not a copy
        return images[torch.as_tensor(indices, dtype=torch.long)]
    return images.batch(indices)


def load_image_folder(root: str | os.PathLike, size: int = 112) -> tuple[Tensor, Tensor, list[str]]:
    """Images of ``root/<identity>/*.png|jpg`` -> (images, labels, identity names), all in memory."""
    folder = ImageFolder(root, size)
    return folder.batch(range(len(folder))), folder.labels, folder.names
