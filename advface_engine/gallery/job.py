"""Re-protect a stored gallery: streamed, resumable after ``kill -9``, byte-identical, refusing foreign manifests.

The gallery is cut into chunks of ``chunk_rows`` rows, protected in batches of ``batch_size``. Each
finished chunk is stored durably and recorded in ``<output>.job/manifest.json`` (rewritten atomically)
with the sha256 of its input rows and of its output bytes. npy, safetensors and FAISS outputs of the
local engine are written in place: the output's temporary file ``<output>.job/output.<format>`` is laid
out whole (header first) and each chunk's rows and ids are written at their offset and fdatasynced
(``OutputInPlace``), so when every chunk is done the file only needs an fsync and a rename onto
``output``. Parquet outputs and Ray jobs keep each chunk in ``<output>.job/parts/<k>.bin``
(``PartFiles``: ``write_atomic``, temporary file, fsync, rename) and assemble the output from the parts
at the end, in a temporary file renamed onto ``output``. Then the job folder is removed.

This module orchestrates: it checks the arguments, fingerprints the job (``_prepare``), runs the
preflight (``_preflight``), has the pending chunks computed by the local engine (local.py) or Ray
actors (distributed.py), both through ``ChunkJob`` (worker.py), and assembles the output. The job
folder, its manifest and parts, and the one atomic write are store.py's: the folder is the job's own
(made by it, marked, locked while the job runs) and only its own files are deleted there, by name.

A rerun of the same command checks the recorded chunks (``ChunkJob.holds``), skips them and computes
the rest with the same chunk and batch layout, so its output is byte-identical to an uninterrupted
run. On a GPU that needs deterministic kernels: cuDNN is held to its deterministic algorithms for
the job (``deterministic_cudnn``; the fused kernels use no atomics).

The manifest holds a fingerprint of the input (size and a hash of its header and sampled blocks),
the models (checksums of their architecture and weights), the config, the keep_out basis (its checksum,
where one is given; one the job made of its input, ``keep_out="auto"``, is kept in the job folder for a
resume), the engine and the layout; a rerun
whose fingerprint differs is refused, and a malformed manifest is refused naming the field
(``_check_manifest``). Nothing in it is taken on trust that the input can check: a resumed chunk's
input rows are read again and must match their checksum (else the input changed since the job
began: refused), its recorded bad rows must be the input's, and ids stored in place must be the
input's. The summary's figures come from the input's rows and the output's: gathered as chunks are stored,
read at assembly for resumed chunks (``Figures``); at assembly every chunk's input rows are read and
checked again if the input file changed (inode, size, mtime, ctime) since the job read them.

What a manifest and parts can forge: checksums need no secret, so whoever can write the job folder
can give a part any bytes and its matching sha256. The cheap checks (bad rows kept byte for byte,
protected rows finite and not zero) catch damage; a locally computed job also recomputes one batch of
each resumed chunk, chosen at random, and compares it bit for bit, which catches a part replaced
wholesale (zeros, the unprotected rows, another chunk). A few rows altered in a part, or any forgery
on Ray (the driver's CPU model would not reproduce a GPU actor's bits, so it does not recompute), can
pass: only recomputing everything would catch them, and then there is nothing to resume.

Every output says how it was made (``provenance``: the fingerprint's input, models, config and layout, and the
versions), in its metadata or a ``.provenance.json`` beside it; it holds nothing that differs between runs.

Bad rows, with NaN or Inf or all zero (no direction to protect), follow ``on_bad_rows``: "fail"
reads the whole input first and, before any work, stops with an error naming them, "skip"
drops them and "copy" stores them unchanged; all three list them in ``<output>.bad-rows.json``.
Stored chunks always hold bad rows unchanged, so the policy is applied at assembly and may change between
reruns (with rows skipped, an output written in place is written again without them: ``compact.<format>``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..config import ProtectConfig
from ..ensemble import members
from ..errors import BadFeaturesError
from ..features import BAD_ROWS, bad_rows_of
from ..models.io import model_checksum
from ..principal import Moments, basis_checksum, check_basis, load_basis, save_basis, variance_share
from ..progress import progress_bar
from ..stats import FIT_ROWS, MIN_ANCHOR_COSINE, sample_rows
from .distributed import ray_session, run_ray, use_gpus
from .formats import RAW_FORMATS, Chunk, Gallery, GalleryWriter, check_convertible, format_of, open_gallery
from .local import Prefetch, run_local
from .store import (
    AUTO_BASIS,
    CREATED_BY,
    JOB_FILES,
    MARKER,
    PART,
    POLICIES,
    Manifest,
    OutputInPlace,
    PartFiles,
    _check_workspace,
    _claim,
    _plain,
    _read_manifest,
    _remove_job,
    _stat,
    _workspace,
    read_part,
    sha256_of,
    write_atomic,
    write_part,
)
from .worker import ChunkJob, JobSpec, Loaded, _changed_error, deterministic_cudnn

# the names of the job's parts, importable from here as well as from their modules
__all__ = ["CHUNK_BYTES", "COSINE_BINS", "CREATED_BY", "ENGINES", "JOB_FILES", "MARKER", "PART", "POLICIES",
           "SIDECAR_FORMATS", "STATS_ROWS", "VERSIONS", "ChunkJob", "Cosines", "Figures", "GalleryResult",
           "GalleryWriter", "JobSpec", "Loaded", "Manifest", "OutputInPlace", "PartFiles", "Prefetch", "assemble",
           "deterministic_cudnn", "model_checksum", "protect_gallery", "provenance", "read_part", "run_local",
           "sha256_of", "write_atomic", "write_part"]

ENGINES = ("local", "ray")
CHUNK_BYTES = 32 << 20  # default chunk: about 32 MiB of rows, a multiple of the batch size
STATS_ROWS = 256  # protected rows whose ProtectionStats the summary reports (four forward passes each), as many as
# the preflight samples: enough for its quantiles and the guard's share (+-3 points), a small cost on a small gallery
COSINE_BINS = 20_000  # histogram of cos(z, protected z) over [-1, 1]: the summary's quantiles within 1e-4
SIDECAR_FORMATS = ("npy", "faiss")  # formats with no room for metadata: provenance goes to <output>.provenance.json
VERSIONS = ("advface_engine", "torch", "triton")  # the fingerprint's engine entries that the provenance keeps


@dataclass
class GalleryResult:
    """What a finished job did."""

    output: Path
    format: str
    rows: int
    rows_written: int
    bad_rows: int
    chunks: int
    resumed_chunks: int
    bad_rows_file: Path | None = None
    # cos(z, protected z) over the protected rows, computed at assembly from the input and the output: "mean",
    # "min", "max" exact, quantiles "p05" ... "p95" within 1e-4 (``Cosines``); None without protected rows,
    # or when a rerun only finished the cleanup of a job already assembled
    cosine: dict | None = None
    # "fit": the preflight's FitReport (rows, anchor_cosine quantiles; with a keep_out basis, "keep_out": its k and
    # its share of the preflight rows' variance, ``principal.variance_share``); "sample": ProtectionStats.summary() of
    # a seeded sample of up to STATS_ROWS protected rows, computed at assembly from the input and the output
    stats: dict | None = None


class Cosines:
    """cos(z_i, protected_i) over the protected rows, gathered a chunk at a time in flat memory for the job's
    summary: count, mean, min and max exact, quantiles from a histogram of COSINE_BINS bins over [-1, 1]."""

    def __init__(self):
        self.sums, self.count, self.low, self.high = [], 0, math.inf, -math.inf
        self.hist = np.zeros(COSINE_BINS, np.int64)

    @property
    def total(self) -> float:
        """The sum of the cosines, the same whatever order their chunks came in (``math.fsum``)."""
        return math.fsum(self.sums)

    def add(self, z: np.ndarray, protected: np.ndarray) -> None:
        """The rows' cosines, in float64 a block of 256 KiB at a time (whole-chunk float64 copies would be the
        job's largest allocation; blocks that fit the cache are faster too)."""
        if not len(z):
            return
        cos, block = np.empty(len(z)), max(1, 32768 // z.shape[1])
        for i in range(0, len(z), block):
            a, b = z[i:i + block].astype(np.float64), protected[i:i + block].astype(np.float64)
            cos[i:i + block] = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                                           1e-30)
        self.sums.append(float(cos.sum()))
        self.count += len(cos)
        self.low, self.high = min(self.low, float(cos.min())), max(self.high, float(cos.max()))
        bins = np.clip(((cos + 1) * (COSINE_BINS / 2)).astype(np.int64), 0, COSINE_BINS - 1)
        self.hist += np.bincount(bins, minlength=COSINE_BINS)

    def summary(self) -> dict | None:
        """{"mean", "min", "p05", "p25", "median", "p75", "p95", "max"}; None when no row was protected."""
        if not self.count:
            return None
        cumulative = np.cumsum(self.hist)

        def quantile(p: float) -> float:  # the bin holding the value of rank p (n - 1), at its centre
            k = int(np.searchsorted(cumulative, p * (self.count - 1), side="right"))
            return min(max((k + 0.5) * 2 / COSINE_BINS - 1, self.low), self.high)

        return {"mean": self.total / self.count, "min": self.low,
                **{name: quantile(p) for name, p in (("p05", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75),
                                                     ("p95", 0.95))},
                "max": self.high}


class Figures:
    """The summary's figures, from the input's rows and the output's (never from the manifest), gathered a chunk
    at a time in any order and combined in chunk order: the cosines of every protected row (``Cosines``), a
    seeded sample of up to STATS_ROWS (input, protected) row pairs for ``Protector.stats``, and the bad rows
    with their ids. ``input_changed``: whether the input file changed since the figures began, so rows read
    from it before may no longer be its rows."""

    def __init__(self, gallery: Gallery):
        self.path, self.state = gallery.path, _file_state(gallery.path)
        self.cosines, self.sample = Cosines(), sample_rows(gallery.num_rows, STATS_ROWS)
        self.picked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bad: dict[int, tuple[list[int], list]] = {}

    def __contains__(self, k: int) -> bool:
        return k in self.picked

    def add(self, k: int, rec: dict, chunk: Chunk, rows: np.ndarray) -> None:
        """Chunk k's figures (``rec`` its record): ``chunk`` its input rows and ids, ``rows`` the output's (bad
        rows unchanged)."""
        z, bad = chunk.rows, np.asarray(rec["bad"], dtype=np.int64)
        good = np.ones(len(z), dtype=bool)
        good[bad] = False
        self.cosines.add(z[good], rows[good]) if bad.size else self.cosines.add(z, rows)
        mine = self.sample[(self.sample >= rec["start"]) & (self.sample < rec["stop"])] - rec["start"]
        mine = mine[good[mine]]
        self.picked[k] = (z[mine], rows[mine])
        self.bad[k] = ((rec["start"] + bad).tolist(),
                       [_json_id(i) for i in chunk.ids[bad].tolist()] if chunk.ids is not None else [])

    def bad_rows(self) -> tuple[list[int], list]:
        """Every bad row, ascending, and their ids (empty where the gallery has none)."""
        rows, ids = [], []
        for k in sorted(self.bad):
            rows += self.bad[k][0]
            ids += self.bad[k][1]
        return rows, ids

    def stats(self, stats_of) -> dict | None:
        """``stats_of(z, protected)`` (Protector.stats) of the sample's rows, summarised; None without any."""
        pairs = [self.picked[k] for k in sorted(self.picked)]
        z, protected = (np.concatenate(side) for side in zip(*pairs)) if pairs else ((), ())
        return stats_of(torch.from_numpy(z), torch.from_numpy(protected)).summary() if len(z) else None

    def input_changed(self) -> bool:
        return _file_state(self.path) != self.state


def _file_state(path: Path) -> tuple[int, int, int, int]:
    """A file's inode, size, mtime and ctime: any write (or a replaced file) changes one of them."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _bad_rows_error(path: Path, rows: list[int], listed: Path | None = None) -> BadFeaturesError:
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    where = f"; all listed in {listed}" if listed is not None else ""
    return BadFeaturesError(f"{path}: rows {rows[:10]}{more} have NaN or Inf values or are all zero (--on-bad-rows "
                            f"fail{where}); rerun with --on-bad-rows skip to drop them or copy to keep them "
                            "unchanged (both record them)", rows)


def _refuse_bad_rows(gallery: Gallery, chunk_rows: int, output: Path, progress: bool) -> None:
    """Under "fail", before any work: every row read (streamed); bad rows (``bad_rows_of``), if any, are all
    listed in ``<output>.bad-rows.json`` and named by the error, so the data can be fixed in one go."""
    rows, ids = [], []
    with progress_bar(total=gallery.num_rows, unit="row", unit_scale=True, desc="check rows",
                      progress=progress) as bar:
        for start in range(0, gallery.num_rows, chunk_rows):
            chunk = gallery.read(start, min(start + chunk_rows, gallery.num_rows))
            bad = bad_rows_of(chunk.rows)
            rows += (start + bad).tolist()
            if chunk.ids is not None:
                ids += [_json_id(i) for i in chunk.ids[bad].tolist()]
            bar.update(len(chunk.rows))
    if rows:
        output.parent.mkdir(parents=True, exist_ok=True)
        raise _bad_rows_error(gallery.path, rows, _write_bad_rows(output, gallery, "fail", rows, ids))


def _write_bad_rows(output: Path, gallery: Gallery, policy: str, rows: list[int], ids: list,
                    tmp: Path | None = None) -> Path:
    """``<output>.bad-rows.json``: the policy, the bad rows and (where the gallery has ids) their ids."""
    side = output.with_name(output.name + ".bad-rows.json")
    report = {"policy": policy, "rows": rows, **({"ids": ids} if gallery.ids_dtype is not None else {})}
    write_atomic(side, json.dumps(report).encode(), tmp)
    return side


def _json_id(value):
    """An id as JSON can hold it: numbers and strings as they are, null for a missing id, text otherwise."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None if math.isnan(value) else str(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def assemble(job: ChunkJob, manifest: Manifest, figures: Figures, fmt: str, output: Path, policy: str,
             progress: bool = True, fit: dict | None = None) -> GalleryResult:
    """Complete the output, rename it onto ``output``, remove the job folder.

    Written in place (``OutputInPlace``), the temporary output holds every chunk's rows and ids already: it
    is the output, fsynced and renamed, unless bad rows are skipped (the rows kept are then written again,
    to ``compact.<format>``). From part files (``PartFiles``) the output is written in the target format,
    chunk by chunk. Chunks were checked when stored or when the job resumed (``ChunkJob.holds``).

    The summary's figures come from the input's rows and the output's, never from the manifest
    (``Figures``): those of the chunks computed in this run were gathered as they were stored; for the
    others, the input's rows and the stored ones are read here, and so is every chunk when the input file
    changed since the job read it: its rows must still match their recorded checksum, else the input
    changed during the job. ``fit``: the preflight's figures, reported with them. The output carries the
    job's ``provenance``: in its metadata (safetensors, Parquet) or in ``<output>.provenance.json`` beside
    it (npy, FAISS).
    """
    gallery, work, store = job.gallery, manifest.work, job.store
    records = [manifest.chunks[k] for k in range(job.num_chunks)]
    num_bad = sum(len(r["bad"]) for r in records)
    rows_written = gallery.num_rows - (num_bad if policy == "skip" else 0)
    made = provenance(manifest.fingerprint, policy)
    rewrite = not isinstance(store, OutputInPlace) or rows_written < gallery.num_rows
    if rewrite:
        tmp = work / f"{'compact' if isinstance(store, OutputInPlace) else 'output'}.{fmt}"
        writer = GalleryWriter(fmt, tmp, gallery, rows_written, None if fmt in SIDECAR_FORMATS else made)
    else:
        writer = store.writer
    recheck = figures.input_changed()
    for k, rec in enumerate(progress_bar(records, progress=progress, desc="assemble", unit="chunk")):
        if k in figures and not rewrite and not recheck:
            continue
        stored = store.load(k, rec["start"], rec["stop"])
        if stored is None:
            manifest.chunks.pop(k)
            manifest.save()
            raise ValueError(f"{work}: chunk {k}'s stored rows ({rec['start']}..{rec['stop'] - 1}) are missing or "
                             "truncated; rerun to recompute that chunk")
        chunk = gallery.read(rec["start"], rec["stop"])
        if sha256_of(chunk.rows) != rec["input_sha256"]:
            raise _changed_error(gallery.path, rec, work)
        if k not in figures:
            figures.add(k, rec, chunk, stored[0])
        if rewrite:
            chunk = Chunk(stored[0], chunk.ids, chunk.table)
            if rec["bad"]:
                good = np.ones(len(chunk.rows), dtype=bool)
                good[rec["bad"]] = False
                if policy == "skip":
                    chunk = chunk.take(good)
                else:
                    chunk.unchanged = ~good
            writer.write(chunk)
    writer.finish()
    store.close()
    bad_rows, bad_ids = figures.bad_rows()
    side = output.with_name(output.name + ".bad-rows.json")
    if bad_rows:
        _write_bad_rows(output, gallery, policy, bad_rows, bad_ids, work / "bad-rows.json.tmp")
    elif side.exists():
        side.unlink()
    made_side = output.with_name(output.name + ".provenance.json")
    if fmt in SIDECAR_FORMATS:
        write_atomic(made_side, json.dumps(made, indent=1, sort_keys=True).encode(), work / "provenance.json.tmp")
    elif made_side.exists():  # an earlier output's, in a format that had no room for it
        made_side.unlink()
    sample = figures.stats(job.protector.stats)
    stats = {**({"fit": fit} if fit is not None else {}), **({"sample": sample} if sample is not None else {})}
    result = GalleryResult(output, fmt, gallery.num_rows, rows_written, len(bad_rows), job.num_chunks, 0,
                           side if bad_rows else None, figures.cosines.summary(), stats or None)
    manifest.final = {**_stat(writer.path), "result": {
        "format": fmt, "policy": policy, "rows_written": rows_written, "bad_rows": len(bad_rows),
        "bad_rows_file": str(side) if bad_rows else None, "cosine": result.cosine, "stats": result.stats}}
    manifest.save()
    os.replace(writer.path, output)
    _remove_job(work)
    return result


BASIS_CHUNK_ROWS = 65536  # rows read at a time for a basis: the same chunks give the same float64 sums


def gallery_moments(gallery: Gallery, progress: bool = True, chunk_rows: int = BASIS_CHUNK_ROWS) -> Moments:
    """The float64 moments (``principal.Moments``) of a gallery's rows, bad rows left out, read chunk by chunk:
    its principal directions in one pass."""
    moments = Moments(gallery.dim)
    with progress_bar(total=gallery.num_rows, unit="row", unit_scale=True, desc="basis", progress=progress) as bar:
        for start in range(0, gallery.num_rows, chunk_rows):
            rows = gallery.read(start, min(start + chunk_rows, gallery.num_rows)).rows
            moments.add(np.delete(rows, bad_rows_of(rows), axis=0))
            bar.update(len(rows))
    return moments


def auto_k(keep_out) -> int | None:
    """k of a keep_out given as "auto:K"; 0 for "auto" (as many as hold AUTO_SHARE of the variance); None for
    anything else (a file, a tensor)."""
    if not isinstance(keep_out, str) or not (keep_out == "auto" or keep_out.startswith("auto:")):
        return None
    if keep_out == "auto":
        return 0
    k = keep_out[len("auto:"):]
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"keep_out {keep_out!r}: 'auto' or 'auto:K' with K a positive integer (the directions "
                         "kept out)")
    return int(k)


def _auto_basis(work: Path, gallery: Gallery, k: int, progress: bool) -> Tensor | None:
    """keep_out "auto" (k 0) or "auto:k": the basis an earlier run of this job made and kept in its folder
    (``AUTO_BASIS``, written once its manifest is), else the input's top principal directions, k of them or as
    many as hold AUTO_SHARE of its variance (``gallery_moments``); None for an input without usable rows."""
    kept = work / AUTO_BASIS
    if kept.is_file() and not kept.is_symlink():
        basis = load_basis(kept)
        if basis.shape[1] == gallery.dim and k in (0, basis.shape[0]):
            return basis
    if not k < gallery.dim:
        raise ValueError(f"keep_out auto:{k} keeps out {k} directions of {gallery.dim}-dim rows: K must be below "
                         f"{gallery.dim}")
    moments = gallery_moments(gallery, progress)
    if moments.count == 0:  # no usable rows: nothing to protect, nothing to keep anything out of
        return None
    try:
        return moments.directions(k or None)
    except ValueError as err:  # too few rows, or rows that do not vary
        raise ValueError(f"keep_out {'auto' if not k else f'auto:{k}'}: {err}; give a basis made of other rows "
                         "(advface basis) or leave keep_out out") from None


def protect_gallery(
    input: str | os.PathLike,
    output: str | os.PathLike,
    shadow: str | os.PathLike | nn.Module | list,
    encoder: str | os.PathLike | nn.Module,
    config: ProtectConfig | None = None,
    *,
    batch_size: int = 1024,
    chunk_rows: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    format: str | None = None,
    on_bad_rows: str = "fail",
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    embedding_key: str | None = None,
    id_key: str | None = None,
    encoder_arch: str | None = None,
    encoder_options: dict | None = None,
    backend_options: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    min_anchor_cosine: float | None = MIN_ANCHOR_COSINE,
    force: bool = False,
    keep_out: str | os.PathLike | Tensor | np.ndarray | None = None,
) -> GalleryResult:
    """Replace every embedding of a stored gallery by its protected feature (ALGORITHM.md), streamed and resumable.

    shadow, encoder: checkpoint paths (``save_model``) or modules; shadow may be a list of them, an ensemble
    protecting together (``Protector``), its checksums in the fingerprint in order; the encoder may also be any file
    ``load_encoder`` takes (ONNX; a state dict with ``encoder_arch``), ``encoder_options`` its other keywords
    (an ONNX model's ``channel_order``, ``mean``, ``std``, ``input_size``). ``backend_options``: the Protector's
    (e.g. ``{"dtype": "bf16"}``: the decoder in bfloat16), in the fingerprint. ``format``: the output's format,
    by default the output's suffix, else the input's. ``chunk_rows``: rows per checkpointed chunk
    (default: about 32 MiB of rows, a multiple of ``batch_size``). ``engine="ray"``: Ray Data
    actors, ``workers`` of them (default one per GPU, else per CPU), on ``ray_address`` or a local Ray.
    ``min_anchor_cosine``: the preflight (``_preflight``) refuses a shadow whose anchors E(S(z)) have a
    median cosine to the gallery's features below it, before anything is written; None or ``force`` runs
    anyway. ``keep_out``: a basis file (``advface basis``) or a (k, D) tensor: the Protector's keep_out, its
    checksum in the fingerprint; "auto" (or "auto:K") makes it of the input's rows first (one more pass): the
    fewest top principal directions that hold AUTO_SHARE of their variance (K of them), kept in the job folder.
    """
    shadow = _shadow_spec(shadow)
    auto = auto_k(keep_out)
    if auto is None and isinstance(keep_out, (str, os.PathLike)):
        keep_out = os.fspath(keep_out)
        if not os.path.isfile(keep_out):
            raise FileNotFoundError(f"no basis file at {keep_out}")
    elif auto is None and keep_out is not None:
        keep_out = check_basis(keep_out)
    if on_bad_rows not in POLICIES:
        raise ValueError(f"on_bad_rows must be one of {POLICIES}, got {on_bad_rows!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if (workers is not None or ray_address is not None) and engine != "ray":
        raise ValueError("--workers and --ray-address (workers=, ray_address=) are for Ray: they need --engine ray "
                         "(engine='ray')")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if min_anchor_cosine is not None and (isinstance(min_anchor_cosine, bool) or not isinstance(
            min_anchor_cosine, (int, float)) or not -1 <= min_anchor_cosine <= 1):
        raise ValueError(f"min_anchor_cosine must be a number in [-1, 1] or None, got {min_anchor_cosine!r}")
    if not isinstance(force, bool):
        raise ValueError(f"force must be True or False, got {force!r}")
    if backend_options is not None and not isinstance(backend_options, dict):
        raise ValueError(f"backend_options must be a dict of the backend's options, got {backend_options!r}")
    if encoder_options is not None and (not isinstance(encoder_options, dict) or isinstance(encoder, nn.Module)):
        raise ValueError("encoder_options are load_encoder's keywords (a dict) for an encoder given as a file; "
                         f"got {type(encoder_options).__name__} with a {type(encoder).__name__} encoder")
    src, dst = Path(input), Path(output)
    if not src.is_file():
        raise FileNotFoundError(f"no gallery file at {src}")
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise ValueError(f"the output path is the input path ({src}); write the protected gallery elsewhere")
    if dst.is_dir():
        raise ValueError(f"the output {dst} is a directory; name the protected gallery file")
    if format is not None and format_of(dst) not in (None, format):
        raise ValueError(f"the output's suffix {dst.suffix!r} names {format_of(dst)}, not {format}: "
                         "give the output a matching suffix")
    work = dst.with_name(dst.name + ".job")
    _check_workspace(work)  # before any work; checked again when the job takes the folder
    gallery = open_gallery(src, embedding_key, id_key)
    try:
        fmt = format or format_of(dst) or gallery.format
        check_convertible(gallery, fmt)
        if auto is not None:
            keep_out = _auto_basis(work, gallery, auto, progress)
        row_bytes = gallery.dim * gallery.dtype.itemsize
        chunk_rows = chunk_rows or batch_size * max(1, CHUNK_BYTES // (row_bytes * batch_size))
        spec = JobSpec(str(src), shadow, encoder, config if config is not None else ProtectConfig(),
                       str(work / "parts"), batch_size, chunk_rows, backend, device, embedding_key, id_key,
                       encoder_arch, encoder_options, backend_options, keep_out)
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_cudnn())
            ray = None
            if engine == "ray":
                ray = stack.enter_context(ray_session(ray_address, workers))
            job, fingerprint = _prepare(spec, gallery, ray)
            fit = _preflight(job, min_anchor_cosine, force)
            if dst.exists():
                finished = _finished(work, fingerprint, dst, fmt, on_bad_rows)
                if finished is not None:
                    return finished
                if not overwrite:
                    raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
            if on_bad_rows == "fail":
                _refuse_bad_rows(gallery, chunk_rows, dst, progress)
            stack.enter_context(_workspace(work))
            manifest = Manifest.open(work, fingerprint)
            if keep_out is not None and auto is not None and not (work / AUTO_BASIS).exists():  # the manifest names it
                save_basis(work / AUTO_BASIS, keep_out)
            if ray is None and fmt in RAW_FORMATS:  # the output written in place: no second pass at the end
                made = None if fmt in SIDECAR_FORMATS else provenance(manifest.fingerprint, on_bad_rows)
                job.store = stack.enter_context(contextlib.closing(OutputInPlace(GalleryWriter(
                    fmt, work / f"output.{fmt}", gallery, gallery.num_rows, made, keep=True))))
            manifest.drop_broken_parts(job, recompute=ray is None)  # the Ray driver's model is not the actors'
            resumed, figures = len(manifest.chunks), Figures(gallery)
            try:
                _compute(job, spec, manifest, on_bad_rows, ray, workers, progress, figures)
                result = assemble(job, manifest, figures, fmt, dst, on_bad_rows, progress, fit)
            except OSError as err:
                if err.filename is None:  # e.g. a full disk while writing: say where
                    raise OSError(err.errno, f"{err.strerror} (writing {work} or {dst}; finished chunks are "
                                             "kept: rerun the same command to resume)") from err
                raise
            return dataclasses.replace(result, resumed_chunks=resumed)
    finally:
        gallery.close()


def _shadow_spec(shadow) -> str | nn.Module | list:
    """The job's shadow as JobSpec holds it: a path (str) or module, or a list of them (an ensemble)."""
    if isinstance(shadow, (list, tuple, nn.ModuleList)):
        shadows = list(shadow)
        if not shadows:
            raise ValueError("the shadow list is empty: give at least one shadow decoder")
        listed = [_shadow_spec(one) for one in shadows]
        if any(isinstance(one, list) for one in listed):
            raise TypeError("a shadow list holds paths or modules, not further lists")
        return listed[0] if len(listed) == 1 else listed
    if isinstance(shadow, nn.Module):
        return shadow
    if isinstance(shadow, (str, os.PathLike)):
        return os.fspath(shadow)
    raise TypeError(f"a shadow is a checkpoint path or a torch.nn.Module, got {type(shadow).__name__}")


def _prepare(spec: JobSpec, gallery: Gallery, ray) -> tuple[ChunkJob, dict]:
    """The job that computes chunks here (or, on Ray, checks the models on the driver) and its fingerprint."""
    if ray is not None:
        spec.device = "cuda" if use_gpus(ray, spec.device) else "cpu"  # what the Ray actors use
        job = ChunkJob(dataclasses.replace(spec, device="cpu", backend="reference", backend_options=None), gallery)
        engine = {"engine": "ray", "backend": spec.backend, "device": "gpu" if spec.device == "cuda" else "cpu"}
    else:
        job = ChunkJob(spec, gallery)
        device = torch.cuda.get_device_name(job.device) if job.device.type == "cuda" else job.device.type
        engine = {"engine": "local", "backend": job.protector.backend_name, "device": device}
    job.check_dim()
    fingerprint = {
        "input": {**gallery.fingerprint(), "embedding_key": spec.embedding_key, "id_key": spec.id_key},
        "shadow": _checksums(job.shadow), "encoder": model_checksum(job.encoder),  # weights, not file bytes
        "encoder_arch": spec.encoder_arch, "encoder_preprocessing": getattr(job.encoder, "preprocessing", None),
        "config": spec.config.to_dict(), "backend_options": spec.backend_options,  # bf16 changes the results
        "engine": {**engine, "advface_engine": __version__, "torch": torch.__version__, **_kernel_versions(engine)},
        "layout": {"chunk_rows": spec.chunk_rows, "batch_size": spec.batch_size}, "bad_rows": BAD_ROWS,
    }
    if job.keep_out is not None:  # only then: a job without one keeps the fingerprint it always had
        fingerprint["keep_out"] = basis_checksum(job.keep_out)
    return job, fingerprint


def _checksums(shadow: nn.Module) -> str | list[str]:
    """The shadow's model_checksum, or the list of an ensemble's, in its order."""
    found = [model_checksum(one) for one in members(shadow)]
    return found[0] if len(found) == 1 else found


def provenance(fingerprint: dict, policy: str) -> dict:
    """What the output records of how it was made: the job's fingerprint (input, the models' checksums, config,
    layout, bad-row rule), the bad-rows policy and the versions of advface-engine, torch (and Triton where
    fused kernels may run). Not the engine's run-specific entries (local or Ray, backend, device), so a Ray
    job's output equals the local one byte for byte, and nothing that varies between runs (no time), so a
    resumed job's output equals an uninterrupted one's."""
    engine = fingerprint["engine"]
    kept = {key: value for key, value in fingerprint.items() if key != "engine"}
    return {**kept, "on_bad_rows": policy, "versions": {k: engine[k] for k in VERSIONS if k in engine}}


def _preflight(job: ChunkJob, min_anchor_cosine: float | None, force: bool) -> dict | None:
    """The shadow-fit check (Protector.check_fit) on a seeded sample of FIT_ROWS rows of the first chunk (one
    read), before anything is written: its figures, or a ValueError naming them and the remedies when the
    median cos(E(S(z)), z) is below ``min_anchor_cosine``, whatever the anchor (anchored at the shadow the
    protection would wreck recognition; anchored at z it would protect little). Not refused with ``force``
    or without a threshold; the figures are reported all the same. None for a gallery without a good row in
    its first chunk."""
    if not job.gallery.num_rows:
        return None
    rows = job.gallery.read(0, min(job.gallery.num_rows, job.spec.chunk_rows)).rows
    rows = np.delete(rows, bad_rows_of(rows), axis=0)
    if not len(rows):
        return None
    picked = torch.from_numpy(np.ascontiguousarray(rows[sample_rows(len(rows), FIT_ROWS)]))
    report = job.protector.check_fit(picked.to(job.device), rows=len(picked))
    if min_anchor_cosine is not None and not force and not report.fits(min_anchor_cosine):
        raise ValueError(f"{job.gallery.path}: {report.message(min_anchor_cosine)}. To run anyway: --force "
                         "(force=True)")
    fit = dataclasses.asdict(report)
    if job.keep_out is not None:  # the basis's share of these rows' variance: low when made from other features
        fit["keep_out"] = {"k": job.keep_out.shape[0], "variance_share": variance_share(job.keep_out, picked)}
    return fit


def _kernel_versions(engine: dict) -> dict:
    """Triton's version where the fused kernels may compute the rows (another version may compile them
    to other instructions, so a resumed job could differ in the last bits)."""
    if engine["backend"] == "reference" or engine["device"] == "cpu":
        return {}
    try:
        import triton
    except ImportError:
        return {}
    return {"triton": triton.__version__}


def _compute(job: ChunkJob, spec: JobSpec, manifest: Manifest, on_bad_rows: str, ray, workers: int | None,
             progress: bool, figures: Figures) -> None:
    """Compute the chunks the manifest does not hold yet, here (their ``figures`` gathered as they are stored)
    or by Ray actors (built from ``spec``)."""
    path, fail = job.gallery.path, on_bad_rows == "fail"  # bad rows were looked for before (_refuse_bad_rows)
    pending = [k for k in range(job.num_chunks) if k not in manifest.chunks]
    done = sum(r["stop"] - r["start"] for r in manifest.chunks.values())
    with progress_bar(total=job.gallery.num_rows, initial=done, unit="row", unit_scale=True, desc="protect-gallery",
                      progress=progress) as bar:
        def record(k: int, rec: dict) -> None:
            if rec["bad"] and fail:
                raise _bad_rows_error(path, [rec["start"] + i for i in rec["bad"]])
            manifest.add(k, rec)
            if ray is not None:  # locally the bar moves batch by batch
                bar.update(rec["stop"] - rec["start"])

        if pending and ray is not None:
            run_ray(ray, spec, pending, record, workers, spec.device == "cuda", fail)
        elif pending:
            run_local(job, pending, record, fail, progress=bar.update, seen=figures.add)


def _finished(work: Path, fingerprint: dict, output: Path, fmt: str, policy: str) -> GalleryResult | None:
    """This very job's result when only its cleanup was interrupted (``output`` is its final file, written
    in this format under this bad-rows policy), else None. The figures are the manifest's, checked for
    form only; the cosines are not kept (the run that assembled the output reported them)."""
    try:
        data = _read_manifest(work, _plain(fingerprint))
    except ValueError:  # another job's, or malformed: refused by the caller (or by Manifest.open, to overwrite)
        return None
    final = data and data.get("final")
    if not final or {k: final[k] for k in ("ino", "size", "mtime_ns")} != _stat(output) \
            or (final["result"]["format"], final["result"]["policy"]) != (fmt, policy):
        return None
    _claim(work)  # an older version's folder: its manifest is this job's
    _remove_job(work)
    r, chunks = final["result"], len(data["chunks"])
    side = Path(r["bad_rows_file"]) if r["bad_rows_file"] else None
    return GalleryResult(output, r["format"], fingerprint["input"]["rows"], r["rows_written"], r["bad_rows"], chunks,
                         chunks, side)
