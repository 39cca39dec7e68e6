"""The gallery job's worker: what turns chunk numbers into stored output rows, the same in this process and
in a Ray actor (``JobSpec`` holds what it needs, picklable). A chunk's rows are read, its bad rows (NaN or
Inf, all zero) kept unchanged, the others protected batch by batch under deterministic cuDNN, so a
recomputed chunk gives the same bytes; they are stored in a part file or in place in the output
(``ChunkJob.store``: store.py), and a finished chunk is checked short of redoing it (``ChunkJob.holds``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ProtectConfig
from ..devices import resolve_device
from ..ensemble import as_shadow
from ..errors import ModelMismatchError
from ..features import bad_rows_of
from ..models import load_encoder
from ..models.io import load_model
from ..principal import load_basis
from ..protect import Protector
from .formats import Chunk, Gallery, open_gallery
from .store import OutputInPlace, PartFiles, sha256_of


@dataclass
class JobSpec:
    """What a worker needs to protect chunks (picklable, for Ray actors)."""

    input: str
    shadow: str | nn.Module | list  # a list: an ensemble of shadows (paths or modules)
    encoder: str | nn.Module
    config: ProtectConfig
    parts: str
    batch_size: int
    chunk_rows: int
    backend: str = "auto"
    device: str = "cpu"
    embedding_key: str | None = None
    id_key: str | None = None
    encoder_arch: str | None = None  # for a plain state-dict encoder file (``load_encoder``)
    encoder_options: dict | None = None  # other ``load_encoder`` keywords: an ONNX encoder's preprocessing
    backend_options: dict | None = None  # the backend's options (Protector's), e.g. {"dtype": "bf16"}
    keep_out: str | Tensor | None = None  # a basis file (``principal.save_basis``) or tensor: Protector's keep_out


@contextlib.contextmanager
def deterministic_cudnn():
    """cuDNN restricted to deterministic algorithms, chosen by heuristics (not timed), restored after.

    Some backward-data algorithms add with atomics, so a chunk recomputed after a crash could
    differ from the first run in the last bits; the same shapes must always give the same bytes.
    """
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _load(model: str | os.PathLike | nn.Module, device: torch.device, loader) -> nn.Module:
    """A module moved to ``device``, or ``loader(path, device)``."""
    return model.to(device) if isinstance(model, nn.Module) else loader(model, device)


class ChunkJob:
    """Turns chunk numbers into stored output rows: read rows, protect the finite ones, store and checksum.

    ``store``: where the rows go, part files (``PartFiles``, the default: in a Ray actor too) or the output's
    temporary file (``OutputInPlace``, which the job sets for the local engine where the format allows).
    """

    def __init__(self, spec: JobSpec, gallery: Gallery | None = None):
        self.spec = spec
        self.gallery = gallery or open_gallery(spec.input, spec.embedding_key, spec.id_key)
        self.device = resolve_device(spec.device)
        shadows = spec.shadow if isinstance(spec.shadow, list) else [spec.shadow]
        self.shadow = as_shadow([_load(one, self.device, load_model) for one in shadows])
        self.encoder = _load(spec.encoder, self.device,
                             lambda path, device: load_encoder(path, spec.encoder_arch, device,
                                                               **(spec.encoder_options or {})))
        self.keep_out = spec.keep_out if spec.keep_out is None or isinstance(spec.keep_out, Tensor) \
            else load_basis(spec.keep_out)
        if self.keep_out is not None and self.keep_out.shape[1] != self.gallery.dim:
            named = "" if isinstance(spec.keep_out, Tensor) else f" {spec.keep_out}"
            raise ValueError(f"keep_out{named} is a basis of {self.keep_out.shape[1]}-dim features and "
                             f"{self.gallery.path} holds {self.gallery.dim}-dim rows: make it from features of "
                             "this encoder")
        self.protector = Protector(shadow=self.shadow, encoder=self.encoder, config=spec.config, backend=spec.backend,
                                   backend_options=spec.backend_options, keep_out=self.keep_out)
        self.work = Path(spec.parts).parent
        self.store: PartFiles | OutputInPlace = PartFiles(Path(spec.parts), self.gallery.dim, self.gallery.dtype)
        self.num_chunks = -(-self.gallery.num_rows // spec.chunk_rows)

    def bounds(self, k: int) -> tuple[int, int]:
        start = k * self.spec.chunk_rows
        return start, min(start + self.spec.chunk_rows, self.gallery.num_rows)

    def check_dim(self) -> None:
        """One unit row through the Protector: models that do not fit the gallery (or each other: a
        decoder given as the encoder) fail here, before any work."""
        try:
            self.protector(torch.eye(1, self.gallery.dim, device=self.device))
        except (ValueError, RuntimeError) as err:
            raise ModelMismatchError(f"{self.gallery.path}: the shadow decoder and encoder cannot protect the "
                                     f"gallery's {self.gallery.dim}-d rows: {err}") from err

    def read(self, k: int) -> Loaded:
        """Chunk k's rows and their checksum; a pinned CPU tensor on a CUDA device, so copies overlap compute."""
        chunk = self.gallery.read(*self.bounds(k))
        z = torch.from_numpy(chunk.rows)
        return Loaded(chunk, z.pin_memory() if self.device.type == "cuda" else z, sha256_of(chunk.rows))

    def protect(self, z: torch.Tensor, out: np.ndarray, progress=None) -> None:
        """Protected rows of z into ``out``, batch by batch; ``progress(rows)`` after each batch."""
        for i in range(0, len(z), self.spec.batch_size):
            batch = z[i:i + self.spec.batch_size]
            out[i:i + len(batch)] = self.protector(batch.to(self.device, non_blocking=True)).cpu().numpy()
            if progress is not None:
                progress(len(batch))

    def compute(self, k: int, loaded: Loaded | None = None, fail: bool = False,
                progress=None) -> tuple[dict, np.ndarray | None]:
        """Chunk k's record (bad rows listed chunk-local) and its rows: protected, bad rows unchanged.

        With ``fail`` a chunk with bad rows is not computed (rows None).
        """
        loaded = loaded or self.read(k)
        rows = loaded.chunk.rows
        start, stop = self.bounds(k)
        bad, good = _bad_and_good(rows)
        record = {"start": start, "stop": stop, "input_sha256": loaded.input_sha256, "bad": bad.tolist()}
        if bad.size and fail:  # found before any work (_refuse_bad_rows): here only if the input changed since
            return record, None
        if not bad.size:
            out = np.empty_like(rows)
            self.protect(_good_z(loaded, good), out, progress)
            return record, out
        out, protected = rows.copy(), np.empty((len(rows) - bad.size, rows.shape[1]), rows.dtype)
        self.protect(_good_z(loaded, good), protected, progress)
        out[good] = protected
        if progress is not None:
            progress(bad.size)  # bad rows are kept unchanged
        return record, out

    def holds(self, k: int, record: dict, recompute: bool = True) -> bool:
        """Whether chunk k's stored rows (its part, or its rows in the output) are what ``compute`` wrote, as
        far as a check short of redoing it can tell.

        They must match their checksum, hold the input's bad rows byte for byte (they are the input's:
        recorded ones that are not, or unrecorded ones, fail) and protected rows that are finite and not
        zero; ids stored beside them must be the input's; with ``recompute``, one batch of its protected
        rows, chosen at random, is recomputed (the same rows in the same batch as ``compute`` gives them)
        and must equal the stored ones bit for bit. Input rows that no longer match their recorded checksum
        are refused (ValueError): the input changed since the job began.
        """
        start, stop = self.bounds(k)
        stored = self.store.load(k, start, stop)
        if stored is None or sha256_of(stored[0]) != record["sha256"]:
            return False
        (part, ids), loaded = stored, self.read(k)
        if loaded.input_sha256 != record["input_sha256"]:
            raise _changed_error(self.gallery.path, record, self.work)
        if ids is not None and ids.tobytes() != np.asarray(loaded.chunk.ids, ids.dtype).tobytes():
            return False
        rows = loaded.chunk.rows
        bad, good = _bad_and_good(rows)
        if bad.tolist() != record["bad"] or part[bad].tobytes() != rows[bad].tobytes() or bad_rows_of(part[good]).size:
            return False
        if not recompute or not good.any():
            return True
        size = self.spec.batch_size
        i = secrets.randbelow(-(-int(good.sum()) // size)) * size
        batch = _good_z(loaded, good)[i:i + size]
        out = np.empty((len(batch), rows.shape[1]), rows.dtype)
        self.protect(batch, out)
        return out.tobytes() == part[good][i:i + size].tobytes()

    def save(self, k: int, record: dict, rows: np.ndarray, ids: np.ndarray | None = None) -> dict:
        """Store chunk k's rows (and the input's ids for them, where the store keeps ids); the record gains
        their sha256."""
        return {**record, "sha256": self.store.save(k, record["start"], rows, ids)}

    def run(self, k: int, fail: bool = False) -> dict:
        """Compute and save chunk k; its record."""
        record, rows = self.compute(k, fail=fail)
        return record if rows is None else self.save(k, record, rows)


@dataclass
class Loaded:
    """A chunk as read ahead of its computation."""

    chunk: Chunk
    z: torch.Tensor
    input_sha256: str


def _bad_and_good(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bad rows' indices (``bad_rows_of``) and a mask of the others."""
    bad = bad_rows_of(rows)
    good = np.ones(len(rows), dtype=bool)
    good[bad] = False
    return bad, good


def _good_z(loaded: Loaded, good: np.ndarray) -> torch.Tensor:
    """The rows to protect, laid out as the batches are cut from them (a recomputed batch must match)."""
    return loaded.z if good.all() else loaded.z[torch.from_numpy(good)]


def _changed_error(path: Path, record: dict, work: Path) -> ValueError:
    return ValueError(f"{path}: rows {record['start']}..{record['stop'] - 1} changed after they were protected "
                      f"(the input was modified during the job, or its manifest altered); delete {work} to start over")
