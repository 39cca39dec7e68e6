"""Verification sets: images plus a pair list (left, right, issame) in contiguous folds.

Sources: the insightface ``.bin`` format (read through a restricted unpickler that never runs
code), image folders (one sub-folder per identity, with a pair file or pairs drawn from the
labels) and the built-in synthetic faces. The left image of a pair is the gallery side, the
right one the probe side.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import images_from_array, load_image_folder, read_image, synthetic_faces
from ..data.folders import open_image


@dataclass
class VerificationSet:
    """``images`` (N, 3, S, S) in [-1, 1]; pair k compares ``images[left[k]]`` with ``images[right[k]]``;
    ``labels`` (N,) each image's identity where the set knows it (synthetic faces, a folder without a pair
    file), else None."""

    name: str
    images: Tensor
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.left, self.right = np.asarray(self.left, dtype=np.int64), np.asarray(self.right, dtype=np.int64)
        self.issame = np.asarray(self.issame, dtype=bool)
        if not (len(self.left) == len(self.right) == len(self.issame)):
            raise ValueError("left, right and issame must have the same length")
        n = len(self.images)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"labels must name the identity of each of the {n} images")
        both = np.concatenate([self.left, self.right])
        if len(both) and (both.min() < 0 or both.max() >= n):
            raise ValueError(f"pair indices must lie in [0, {n})")


# ---------------------------------------------------------------- insightface .bin


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global, so no class is built and no function is called."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refused: the file asks for {module}.{name}; a verification .bin may only hold bytes, lists and booleans"
        )


def _check_bin_payload(payload) -> tuple[list[bytes], list[bool]]:
    """(bins, issame) or a ValueError naming the unexpected type."""
    if not isinstance(payload, (tuple, list)) or len(payload) != 2:
        raise ValueError(f"a verification .bin holds a pair (images, issame), got {type(payload).__name__}")
    bins, issame = payload
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError("a verification .bin holds two lists (encoded images, issame booleans)")
    for item in bins:
        if not isinstance(item, (bytes, bytearray)):
            raise ValueError(f"encoded images must be bytes, found {type(item).__name__}")
    for item in issame:
        if not isinstance(item, bool):
            raise ValueError(f"issame entries must be booleans, found {type(item).__name__}")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs; expected exactly two images per pair")
    return list(bins), list(issame)


def load_bin_payload(data: bytes) -> tuple[list[bytes], list[bool]]:
    """Unpickle a .bin's bytes with the restricted unpickler and check every element's type."""
    try:
        payload = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # damaged pickle data fails in many ways; nothing in it has run
        raise ValueError(f"not a valid verification .bin: {err}") from err
    return _check_bin_payload(payload)


def _bin_payload(path: Path) -> tuple[list[bytes], list[bool]]:
    """``load_bin_payload`` of the file at ``path``, its errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"no verification .bin at {path}")
    try:
        return load_bin_payload(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def check_bin(path: str | os.PathLike) -> None:
    """Check a .bin as ``read_bin`` reads it (the restricted unpickler, every element's type, every image's
    format and pixel count from its header) without decoding the images: a ValueError naming the file."""
    path = Path(path)
    bins, _ = _bin_payload(path)
    for k, blob in enumerate(bins):
        with open_image(io.BytesIO(blob), f"{path}: image {k}"):
            pass


def read_bin(path: str | os.PathLike, size: int | None = None) -> VerificationSet:
    """An insightface verification ``.bin`` (LFW, CFP-FP, AgeDB-30 ...) as a VerificationSet; each image is
    resized to ``size`` as it is decoded (``read_image``), at most MAX_IMAGE_PIXELS pixels."""
    path = Path(path)
    bins, issame = _bin_payload(path)
    arrays = [read_image(io.BytesIO(blob), size, f"{path}: image {k}") for k, blob in enumerate(bins)]
    if len({a.shape for a in arrays}) > 1 and size is None:
        raise ValueError(f"{path} holds images of different sizes; pass size= to resize them")
    images = images_from_array(np.stack(arrays)) if arrays else torch.zeros(0, 3, size or 1, size or 1)
    n = len(issame)
    return VerificationSet(path.stem, images, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2), np.array(issame, bool))


def write_bin(path: str | os.PathLike, images: Tensor, issame) -> None:
    """Write ``images`` (2P, 3, H, W) in [-1, 1] (pairs interleaved) and P ``issame`` flags as a .bin.

    Images are stored as PNG; the file is written to a temporary name and renamed.
    """
    from PIL import Image

    issame = [bool(s) for s in issame]
    if images.dim() != 4 or images.shape[1] != 3 or len(images) != 2 * len(issame):
        raise ValueError(f"need (2 * {len(issame)}, 3, H, W) images, got {tuple(images.shape)}")
    pixels = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    bins = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        bins.append(buffer.getvalue())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    os.replace(tmp, path)


def to_bin(dataset: VerificationSet, path: str | os.PathLike) -> None:
    """Write any VerificationSet as a .bin (images of each pair interleaved)."""
    order = np.stack([dataset.left, dataset.right], axis=1).ravel()
    write_bin(path, dataset.images[torch.as_tensor(order)], dataset.issame)


# ---------------------------------------------------------------- pair lists


def pairs_from_labels(labels, pairs_per_fold: int = 300, folds: int = 10, seed: int = 0):
    """Identity-disjoint folds, each half same-identity and half different-identity pairs.

    Identities are split into ``folds`` contiguous groups; fold f draws its pairs inside group f,
    so a threshold chosen on nine folds is tested on people it has never seen (as in LFW).
    Returns (left, right, issame) with the folds contiguous, as the 10-fold protocol expects.
    """
    labels = np.asarray(labels)
    if pairs_per_fold < 2 or pairs_per_fold % 2:
        raise ValueError(f"pairs_per_fold must be an even number >= 2, got {pairs_per_fold}")
    identities = np.unique(labels)
    if len(identities) < 2 * folds:
        raise ValueError(f"need at least {2 * folds} identities for {folds} folds, got {len(identities)}")
    rng = np.random.default_rng(seed)
    members = {i: np.flatnonzero(labels == i) for i in identities}
    left, right, issame = [], [], []
    for group in np.array_split(identities, folds):
        multi = [i for i in group if len(members[i]) >= 2]
        if not multi:
            raise ValueError("every fold needs identities with at least two images")
        seen: set[tuple[int, int]] = set()
        half = pairs_per_fold // 2
        for same in (True, False):
            drawn, tries = 0, 0
            while drawn < half:
                tries += 1
                if same:
                    a, b = rng.choice(members[rng.choice(multi)], 2, replace=False)
                else:
                    ia, ib = rng.choice(group, 2, replace=False)
                    a, b = rng.choice(members[ia]), rng.choice(members[ib])
                if (int(a), int(b)) in seen and tries < 50 * pairs_per_fold:
                    continue
                seen.add((int(a), int(b)))
                left.append(a)
                right.append(b)
                issame.append(same)
                drawn += 1
    return np.array(left), np.array(right), np.array(issame, bool)


def synthetic_set(num_identities: int = 100, per_identity: int = 10, size: int = 32, pairs_per_fold: int = 300,
                  first_identity: int = 0, seed: int = 0, folds: int = 10) -> VerificationSet:
    """Synthetic faces of identities [first_identity, first_identity + num_identities) with a pair list."""
    images, labels = synthetic_faces(num_identities, per_identity, size, seed=seed, first_identity=first_identity)
    left, right, issame = pairs_from_labels(labels.numpy(), pairs_per_fold, folds, seed)
    return VerificationSet("synthetic", images, left, right, issame, labels.numpy())


def read_pair_file(path: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """Lines ``<relative image path> <relative image path> <1|0>``; blank lines and '#' comments skipped."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2].lower() not in ("1", "0", "true", "false"):
            raise ValueError(f"{path}:{n}: expected '<image> <image> <1|0>', got {line!r}")
        rows.append((parts[0], parts[1], parts[2].lower() in ("1", "true")))
    if not rows:
        raise ValueError(f"{path} lists no pairs")
    return rows


def folder_set(root: str | os.PathLike, size: int = 112, pair_file: str | os.PathLike | None = None,
               pairs_per_fold: int = 300, seed: int = 0, folds: int = 10) -> VerificationSet:
    """Faces under ``root/<identity>/``, with the pairs of ``pair_file`` or pairs drawn from the identities."""
    root = Path(root)
    if pair_file is None:
        images, labels, _ = load_image_folder(root, size)
        left, right, issame = pairs_from_labels(labels.numpy(), pairs_per_fold, folds, seed)
        return VerificationSet(root.name, images, left, right, issame, labels.numpy())
    rows = read_pair_file(pair_file)
    names = sorted({name for a, b, _ in rows for name in (a, b)})
    index = {name: k for k, name in enumerate(names)}
    arrays = []
    for name in names:
        path = (root / name).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            raise FileNotFoundError(f"pair file names {name!r}, not an image under {root}")
        arrays.append(read_image(path, size, path))
    left = [index[a] for a, _, _ in rows]
    right = [index[b] for _, b, _ in rows]
    return VerificationSet(root.name, images_from_array(np.stack(arrays)), left, right, [s for _, _, s in rows])
