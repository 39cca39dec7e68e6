"""Re-protect a stored gallery: streamed, resumable after ``kill -9``, byte-identical, refusing foreign manifests.

The gallery is cut into chunks of ``chunk_rows`` rows, protected in batches of ``batch_size``. Each
finished chunk is written to ``<output>.job/parts/<k>.bin`` (``write_atomic``: temporary file, fsync,
rename) and recorded in ``<output>.job/manifest.json`` (rewritten atomically) with the sha256 of its
input rows and of its output bytes. When every chunk is done the output is assembled from the parts
in the target format, in a temporary file renamed onto ``output``; then the job folder is removed.

The job folder is the job's own: made by it, with a marker file (``MARKER``) in it, and locked while
the job runs. The job refuses a folder it cannot take as its own (a link, a folder holding anything
it does not write, or one with neither marker nor the manifest of an older version) and deletes only
the files it writes there, by name, never following a link (``_check_workspace``, ``_remove_job``).

A rerun of the same command checks the recorded chunks (``ChunkJob.holds``), skips them and computes
the rest with the same chunk and batch layout, so its output is byte-identical to an uninterrupted
run. On a GPU that needs deterministic kernels: cuDNN is held to its deterministic algorithms for
the job (``deterministic_cudnn``; the fused kernels use no atomics).

The manifest holds a fingerprint of the input (size and a hash of its header and sampled blocks),
the models (checksums of their architecture and weights), the config, the engine and the layout; a rerun
whose fingerprint differs is refused, and a malformed manifest is refused naming the field
(``_check_manifest``). Nothing in it is taken on trust that the input can check: a resumed chunk's
input rows are read again and must match their checksum (else the input changed since the job
began: refused), its recorded bad rows must be the input's, and at assembly the input's rows are
checked again and, with the parts, give the summary's figures.

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
Parts always hold bad rows unchanged, so the policy is applied at assembly and may change between
reruns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import secrets
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import ProtectConfig
from ..devices import resolve_device
from ..ensemble import as_shadow, members
from ..errors import BadFeaturesError, ModelMismatchError
from ..features import BAD_ROWS, bad_rows_of
from ..models import load_encoder
from ..models.io import load_model, model_checksum
from ..progress import progress_bar
from ..protect import Protector
from ..stats import FIT_ROWS, MIN_ANCHOR_COSINE, sample_rows
from .formats import (
    FORMATS,
    Chunk,
    Gallery,
    GalleryWriter,
    check_convertible,
    format_of,
    open_gallery,
    open_nofollow,
)

POLICIES = ("fail", "skip", "copy")
ENGINES = ("local", "ray")
CHUNK_BYTES = 32 << 20  # default chunk: about 32 MiB of rows, a multiple of the batch size
STATS_ROWS = 1024  # protected rows whose ProtectionStats the summary reports (four forward passes each)
COSINE_BINS = 20_000  # histogram of cos(z, protected z) over [-1, 1]: the summary's quantiles within 1e-4
MARKER = "advface-job.json"  # written in the job folder when the job makes it: only such a folder is the job's
CREATED_BY = "advface-engine protect-gallery"
# every file the job writes in its folder (GalleryWriter's ids.tmp and output.<format> included), and its parts
JOB_FILES = frozenset({MARKER, MARKER + ".tmp", "lock", "manifest.json", "manifest.json.tmp", "bad-rows.json.tmp",
                       "provenance.json.tmp", "ids.tmp", *(f"output.{fmt}" for fmt in FORMATS)})
SIDECAR_FORMATS = ("npy", "faiss")  # formats with no room for metadata: provenance goes to <output>.provenance.json
VERSIONS = ("advface_engine", "torch", "triton")  # the fingerprint's engine entries that the provenance keeps
PART = re.compile(r"\d{6,}\.bin(\.tmp)?")


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
    # "fit": the preflight's FitReport (rows, anchor_cosine quantiles); "sample": ProtectionStats.summary() of
    # a seeded sample of up to STATS_ROWS protected rows, computed at assembly from the input and the output
    stats: dict | None = None


def sha256_of(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


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
    """Turns chunk numbers into part files: read rows, protect the finite ones, write and checksum."""

    def __init__(self, spec: JobSpec, gallery: Gallery | None = None):
        self.spec = spec
        self.gallery = gallery or open_gallery(spec.input, spec.embedding_key, spec.id_key)
        self.device = resolve_device(spec.device)
        shadows = spec.shadow if isinstance(spec.shadow, list) else [spec.shadow]
        self.shadow = as_shadow([_load(one, self.device, load_model) for one in shadows])
        self.encoder = _load(spec.encoder, self.device,
                             lambda path, device: load_encoder(path, spec.encoder_arch, device,
                                                               **(spec.encoder_options or {})))
        self.protector = Protector(shadow=self.shadow, encoder=self.encoder, config=spec.config, backend=spec.backend)
        self.parts = Path(spec.parts)
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
        """Whether chunk k's part is what ``compute`` wrote, as far as a check short of redoing it can tell.

        The part must match its checksum, hold the input's bad rows byte for byte (they are the input's:
        recorded ones that are not, or unrecorded ones, fail) and protected rows that are finite and not
        zero; with ``recompute``, one batch of its protected rows, chosen at random, is recomputed (the
        same rows in the same batch as ``compute`` gives them) and must equal the part's bit for bit.
        Input rows that no longer match their recorded checksum are refused (ValueError): the input
        changed since the job began.
        """
        start, stop = self.bounds(k)
        part = read_part(self.parts / f"{k:06d}.bin", (stop - start, self.gallery.dim), self.gallery.dtype)
        if part is None or sha256_of(part) != record["sha256"]:
            return False
        loaded = self.read(k)
        if loaded.input_sha256 != record["input_sha256"]:
            raise _changed_error(self.gallery.path, record, self.parts.parent)
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

    def save(self, k: int, record: dict, rows: np.ndarray) -> dict:
        """Write chunk k's part file; the record gains its sha256."""
        return {**record, "sha256": write_part(self.parts / f"{k:06d}.bin", rows)}

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


class Cosines:
    """cos(z_i, protected_i) over the protected rows, gathered a chunk at a time in flat memory for the job's
    summary: count, mean, min and max exact, quantiles from a histogram of COSINE_BINS bins over [-1, 1]."""

    def __init__(self):
        self.total, self.count, self.low, self.high = 0.0, 0, math.inf, -math.inf
        self.hist = np.zeros(COSINE_BINS, np.int64)

    def add(self, z: np.ndarray, protected: np.ndarray) -> None:
        """The rows' cosines, in float64 a block of rows at a time (whole-chunk float64 copies would be the
        job's largest allocation)."""
        if not len(z):
            return
        cos, block = np.empty(len(z)), 4096
        for i in range(0, len(z), block):
            a, b = z[i:i + block].astype(np.float64), protected[i:i + block].astype(np.float64)
            cos[i:i + block] = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                                           1e-30)
        self.total += float(cos.sum())
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


def write_atomic(path: Path, data, tmp: Path | None = None) -> None:
    """Write ``data`` (bytes-like) to ``path`` through ``tmp`` (default ``<path>.tmp``), fsynced and renamed, so a
    reader finds the old file or the new one, never a part. The temporary file is opened without following a link."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    with open(tmp, "wb", opener=open_nofollow) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_part(path: Path, rows: np.ndarray) -> str:
    """Write rows' bytes to ``path`` (``write_atomic``); return their sha256."""
    data = memoryview(np.ascontiguousarray(rows)).cast("B")
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_part(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    """A part's rows, or None when it is missing or has the wrong size."""
    rows = np.empty(shape, dtype)
    try:
        with open(path, "rb", opener=open_nofollow) as f:
            if os.fstat(f.fileno()).st_size != rows.nbytes or f.readinto(memoryview(rows).cast("B")) != rows.nbytes:
                return None
    except FileNotFoundError:
        return None
    return rows


def _plain(value):
    """JSON round trip, so a fingerprint compares equal to the one read back from a manifest."""
    return json.loads(json.dumps(value))


def _differences(new: dict, old: dict) -> list[str]:
    """Fingerprint entries that differ, as "key" or "key.subkey"."""
    out = []
    for key in sorted(new.keys() | old.keys()):
        a, b = new.get(key), old.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{sub}" for sub in sorted(a.keys() | b.keys()) if a.get(sub) != b.get(sub)]
        elif a != b:
            out.append(key)
    return out


def _is_int(value, low: int, high: int) -> bool:
    """An integer (not a bool, not 1.0) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _check_manifest(data: dict, fingerprint: dict) -> str | None:
    """The first malformed entry of a manifest whose fingerprint is this job's, as "field: expected ...";
    None when there is none.

    The manifest's schema, in one place (a new field is a line here): ``chunks`` maps chunk numbers of this
    layout to records of the rows they cover (``start``, ``stop``), the sha256 of those input rows
    (``input_sha256``) and of the part (``sha256``), and the bad rows, chunk-local and ascending (``bad``);
    ``final`` is null, or the assembled output's identity (``ino``, ``size``, ``mtime_ns``) and ``result``.
    Other keys (an older version's ``input_stat`` and per-chunk ``cosine``) are ignored: nothing reads them.
    """
    rows, size = fingerprint["input"]["rows"], fingerprint["layout"]["chunk_rows"]
    chunks = data.get("chunks")
    if not isinstance(chunks, dict):
        return "chunks: expected an object of chunk records"
    for key, rec in chunks.items():
        field = f"chunks.{key}"
        if not (key.isdecimal() and len(key) < 20 and key == str(int(key)) and int(key) * size < rows):
            return f"{field}: expected a chunk number, 0 to {-(-rows // size) - 1}"
        start = int(key) * size
        stop = min(start + size, rows)
        if not isinstance(rec, dict):
            return f"{field}: expected a chunk record"
        for name, ok, what in [
            ("start", _is_int(rec.get("start"), start, start), f"{start}"),
            ("stop", _is_int(rec.get("stop"), stop, stop), f"{stop}"),
            ("input_sha256", _is_sha256(rec.get("input_sha256")), "a sha256 hex digest"),
            ("sha256", _is_sha256(rec.get("sha256")), "a sha256 hex digest"),
            ("bad", isinstance(rec.get("bad"), list) and all(_is_int(i, 0, stop - start - 1) for i in rec["bad"])
             and all(a < b for a, b in zip(rec["bad"], rec["bad"][1:])),
             f"ascending row numbers, 0 to {stop - start - 1}"),
        ]:
            if not ok:
                return f"{field}.{name}: expected {what}"
    final = data.get("final")
    if final is None:
        return None
    result = final.get("result") if isinstance(final, dict) else None
    if not isinstance(result, dict):
        return "final: expected null, or the output's ino, size, mtime_ns and result"
    for name, ok, what in [
        *((name, _is_int(final.get(name), 0, 2**64), "a non-negative integer") for name in ("ino", "size", "mtime_ns")),
        ("result.format", result.get("format") in FORMATS, f"one of {FORMATS}"),
        ("result.policy", result.get("policy") in POLICIES, f"one of {POLICIES}"),
        ("result.rows_written", _is_int(result.get("rows_written"), 0, rows), f"0 to {rows}"),
        ("result.bad_rows", _is_int(result.get("bad_rows"), 0, rows), f"0 to {rows}"),
        ("result.bad_rows_file", result.get("bad_rows_file") in (None, []) or isinstance(result["bad_rows_file"], str),
         "null or a path"),  # [] for none: an older version's
    ]:
        if not ok:
            return f"final.{name}: expected {what}"
    return None


def _read_manifest(work: Path, fingerprint: dict) -> dict | None:
    """The job folder's manifest (``_check_manifest``), None when it has none; a ValueError when it is not
    readable JSON, is malformed (naming the field) or belongs to another job (naming what differs)."""
    path = work / "manifest.json"
    try:
        with open(path, "rb", opener=open_nofollow) as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); delete {work} to start over") from None
    if not isinstance(data, dict):
        problem = "expected a JSON object"
    elif not isinstance(data.get("fingerprint"), dict):
        problem = "fingerprint: expected an object"
    else:
        differ = _differences(fingerprint, data["fingerprint"])
        if differ:
            raise ValueError(f"{path} belongs to a different job ({', '.join(differ)} differ); rerun with the "
                             f"same input, models and settings to resume it, or delete {work} to start over")
        problem = _check_manifest(data, fingerprint)
    if problem:
        raise ValueError(f"{path} is malformed ({problem}); delete {work} to start over")
    return data


class Manifest:
    """``manifest.json``: the job's fingerprint and its finished chunks, rewritten atomically on every change."""

    def __init__(self, work: Path, fingerprint: dict, chunks: dict | None = None, final: dict | None = None):
        self.work, self.path = work, work / "manifest.json"
        self.fingerprint, self.chunks, self.final = fingerprint, chunks or {}, final

    @classmethod
    def open(cls, work: Path, fingerprint: dict) -> Manifest:
        """The job's manifest, created if new; one that is malformed or another job's is refused.

        The folder is claimed (``_claim``) before anything is written: an older version's folder (its
        manifest, no marker) becomes this job's only once its manifest is found valid for this job.
        """
        fingerprint = _plain(fingerprint)
        data = _read_manifest(work, fingerprint)
        _claim(work)
        (work / "parts").mkdir(exist_ok=True)
        if data is None:
            manifest = cls(work, fingerprint)
            manifest.save()
            return manifest
        return cls(work, fingerprint, {int(k): v for k, v in data["chunks"].items()}, data.get("final"))

    def save(self) -> None:
        write_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "chunks": self.chunks,
                                            "final": self.final}).encode())

    def add(self, k: int, record: dict) -> None:
        self.chunks[k] = record
        self.save()

    def drop_broken_parts(self, job: ChunkJob, recompute: bool) -> int:
        """Forget finished chunks that do not hold up (``ChunkJob.holds``): they are recomputed."""
        broken = [k for k, rec in self.chunks.items() if not job.holds(k, rec, recompute)]
        for k in broken:
            del self.chunks[k]
        if broken:
            self.save()
        return len(broken)


class Prefetch:
    """Runs an iterator in a background thread, up to ``depth`` items queued, so reading overlaps compute."""

    def __init__(self, iterable, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _fill(self, items) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
        except BaseException as err:  # handed to the consumer
            self._put((False, err))
            return
        self._put((False, None))

    def __iter__(self):
        while True:
            ok, item = self._queue.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local(job: ChunkJob, pending: list[int], record, fail: bool, progress=None) -> None:
    """Protect the pending chunks in this process. While one chunk is computed, the next is read and checksummed
    (a reader thread) and the previous one is written and recorded (a writer thread)."""

    def save(k: int, rec: dict, rows: np.ndarray) -> None:
        record(k, job.save(k, rec, rows))

    with Prefetch((k, job.read(k)) for k in pending) as chunks, ThreadPoolExecutor(1) as writer:
        saving = None
        for k, loaded in chunks:
            rec, rows = job.compute(k, loaded, fail=fail, progress=progress)
            if saving is not None:
                saving.result()  # one part in flight; a write error stops the job here
            if rows is None:
                record(k, rec)  # bad rows under "fail": raises
            saving = writer.submit(save, k, rec, rows)
        if saving is not None:
            saving.result()


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


def _changed_error(path: Path, record: dict, work: Path) -> ValueError:
    return ValueError(f"{path}: rows {record['start']}..{record['stop'] - 1} changed after they were protected "
                      f"(the input was modified during the job, or its manifest altered); delete {work} to start over")


def assemble(gallery: Gallery, manifest: Manifest, num_chunks: int, fmt: str, output: Path, policy: str,
             progress: bool = True, stats_of=None, fit: dict | None = None) -> GalleryResult:
    """Write the output from the parts, rename it onto ``output``, remove the job folder.

    Parts were checked when written or when the job resumed (``ChunkJob.holds``). The input is read
    again, chunk by chunk: its rows must still match their recorded checksum (else it changed during
    the job), and with the parts they give the summary's figures, so no figure comes from the manifest:
    the cosines of every protected row and ``stats_of(z, protected)`` (Protector.stats) of a seeded
    sample of up to STATS_ROWS of them. ``fit``: the preflight's figures, reported with them. The output
    carries the job's ``provenance``: in its metadata (safetensors, Parquet) or in ``<output>.provenance.json``
    beside it (npy, FAISS).
    """
    work, records = manifest.work, [manifest.chunks[k] for k in range(num_chunks)]
    num_bad = sum(len(r["bad"]) for r in records)
    tmp = work / f"output.{fmt}"
    made = provenance(manifest.fingerprint, policy)
    writer = GalleryWriter(fmt, tmp, gallery, gallery.num_rows - (num_bad if policy == "skip" else 0), work,
                           None if fmt in SIDECAR_FORMATS else made)
    bad_rows, bad_ids, cosines = [], [], Cosines()
    sample, picked = sample_rows(gallery.num_rows, STATS_ROWS), []
    for k, rec in enumerate(progress_bar(records, progress=progress, desc="assemble", unit="chunk")):
        rows = read_part(work / "parts" / f"{k:06d}.bin", (rec["stop"] - rec["start"], gallery.dim), gallery.dtype)
        if rows is None:
            manifest.chunks.pop(k)
            manifest.save()
            raise ValueError(f"{work}/parts/{k:06d}.bin is missing or truncated; rerun to recompute that chunk")
        chunk = gallery.read(rec["start"], rec["stop"])
        if sha256_of(chunk.rows) != rec["input_sha256"]:
            raise _changed_error(gallery.path, rec, work)
        bad = np.asarray(rec["bad"], dtype=np.int64)
        good = np.ones(len(rows), dtype=bool)
        good[bad] = False
        cosines.add(chunk.rows[good], rows[good]) if bad.size else cosines.add(chunk.rows, rows)
        mine = sample[(sample >= rec["start"]) & (sample < rec["stop"])] - rec["start"]
        mine = mine[good[mine]]
        picked.append((chunk.rows[mine], rows[mine]))
        chunk = Chunk(rows, chunk.ids, chunk.table)
        if bad.size:
            bad_rows += (rec["start"] + bad).tolist()
            if chunk.ids is not None:
                bad_ids += [_json_id(i) for i in chunk.ids[bad].tolist()]
            if policy == "skip":
                chunk = chunk.take(good)
            else:
                chunk.unchanged = ~good
        writer.write(chunk)
    writer.finish()
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
    stats = {"fit": fit} if fit is not None else {}
    z, protected = (np.concatenate(parts) for parts in zip(*picked)) if picked else (np.zeros((0, 0)),) * 2
    if stats_of is not None and len(z):
        stats["sample"] = stats_of(torch.from_numpy(z), torch.from_numpy(protected)).summary()
    result = GalleryResult(output, fmt, gallery.num_rows, writer.num_rows, len(bad_rows), num_chunks, 0,
                           side if bad_rows else None, cosines.summary(), stats or None)
    manifest.final = {**_stat(tmp), "result": {"format": fmt, "policy": policy, "rows_written": writer.num_rows,
                                               "bad_rows": len(bad_rows),
                                               "bad_rows_file": str(side) if bad_rows else None,
                                               "cosine": result.cosine, "stats": result.stats}}
    manifest.save()
    os.replace(tmp, output)
    _remove_job(work)
    return result


def _stat(path: Path) -> dict:
    st = path.stat()  # a rename keeps all three: they identify the assembled file under its final name
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_workspace(work: Path) -> None:
    """Refuse (ValueError) a job folder the job may not take as its own, before it writes or deletes anything.

    Taken: no folder yet; a real folder (not a link) holding only what the job writes (``JOB_FILES``,
    ``parts/`` of part files), as regular files, and the job's marker. A folder an older version left
    has no marker: it is taken when it holds this job's valid manifest (``Manifest.open`` checks it and
    then writes the marker) or no data at all (an empty lock file, an empty ``parts/``: a job stopped
    before its manifest was written).
    """
    try:
        st = os.lstat(work)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    else:
        names, unknown, data = set(), [], False  # data: anything but an empty lock file and an empty parts/
        for entry in os.scandir(work):
            if entry.name == "parts" and entry.is_dir(follow_symlinks=False):
                for part in os.scandir(entry.path):
                    data = True
                    if not (PART.fullmatch(part.name) and part.is_file(follow_symlinks=False)):
                        unknown.append(f"parts/{part.name}")
            elif entry.name in JOB_FILES and entry.is_file(follow_symlinks=False):
                names.add(entry.name)
                data |= entry.name != "lock" or entry.stat(follow_symlinks=False).st_size > 0
            else:
                unknown.append(entry.name)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            problem = f"holds {', '.join(sorted(unknown)[:5])}{more}, which the job did not write"
        elif MARKER in names and not _is_marker(work / MARKER):
            problem = f"has a {MARKER} that this tool did not write"
        elif MARKER not in names and data and "manifest.json" not in names:
            problem = f"has neither the job's marker ({MARKER}) nor a manifest"
        else:
            return
    raise ValueError(f"{work} {problem}: the job works only in a folder it made, and deletes only its own files "
                     "there; move that away (or choose another output) and rerun")


def _is_marker(path: Path) -> bool:
    try:
        with open(path, "rb", opener=open_nofollow) as f:
            data = json.loads(f.read(4096))
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("created_by") == CREATED_BY


def _claim(work: Path) -> None:
    """Write the marker that makes ``work`` the job's folder (``_check_workspace``), where it has none."""
    if not os.path.lexists(work / MARKER):
        write_atomic(work / MARKER, json.dumps({"created_by": CREATED_BY, "output": work.name[:-len(".job")]}).encode())


def _remove_job(work: Path) -> None:
    """Delete the job's own files from its folder, then the folder if that leaves it empty.

    Parts first, then the manifest (which knows the output is final, so an interrupted cleanup can
    finish), the marker last. The folder is opened without following a link and must hold the marker;
    only regular files under the names the job gives them are deleted. Anything else found there is
    left, with the folder, and named in a warning (the output is complete all the same).
    """
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise ValueError(f"{work} is not the job's folder ({err.strerror}); nothing in it was deleted") from None
    try:
        if not _is_file(MARKER, fd):
            raise ValueError(f"{work} has no job marker ({MARKER}); nothing in it was deleted")
        try:
            parts = os.open("parts", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:  # none, or not a folder: left, and named below
            parts = None
        if parts is not None:
            try:
                for name in os.listdir(parts):
                    if PART.fullmatch(name) and _is_file(name, parts):
                        os.unlink(name, dir_fd=parts)
            finally:
                os.close(parts)
            with contextlib.suppress(OSError):  # not empty: left, and named below
                os.rmdir("parts", dir_fd=fd)
        last = ["manifest.json", MARKER]
        for name in [*sorted(JOB_FILES - set(last)), *last]:
            if _is_file(name, fd):
                os.unlink(name, dir_fd=fd)
        left = os.listdir(fd)
    finally:
        os.close(fd)
    if left:
        warnings.warn(f"{work} was left in place: the job deleted its own files, and it still holds "
                      f"{', '.join(sorted(left))}", stacklevel=2)
    else:
        os.rmdir(work)


def _is_file(name: str, dir_fd: int) -> bool:
    """Whether ``name`` in the folder ``dir_fd`` is a regular file (a link is not followed)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _workspace(work: Path):
    """The job folder, made if new or checked (``_check_workspace``), and locked while the job runs: a second
    process on the same output stops with a clear error."""
    import fcntl

    work.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        work.mkdir()
    _check_workspace(work)
    with open(work / "lock", "a", opener=open_nofollow) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another job is running on {work}") from None
        yield


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
    overwrite: bool = False,
    progress: bool = True,
    min_anchor_cosine: float | None = MIN_ANCHOR_COSINE,
    force: bool = False,
) -> GalleryResult:
    """Replace every embedding of a stored gallery by its protected feature (ALGORITHM.md), streamed and resumable.

    shadow, encoder: checkpoint paths (``save_model``) or modules; shadow may be a list of them, an ensemble
    protecting together (``Protector``), its checksums in the fingerprint in order; the encoder may also be any file
    ``load_encoder`` takes (ONNX; a state dict with ``encoder_arch``), ``encoder_options`` its other keywords
    (an ONNX model's ``channel_order``, ``mean``, ``std``, ``input_size``). ``format``: the output's format,
    by default the output's suffix, else the input's. ``chunk_rows``: rows per checkpointed chunk
    (default: about 32 MiB of rows, a multiple of ``batch_size``). ``engine="ray"``: Ray Data
    actors, ``workers`` of them (default one per GPU, else per CPU), on ``ray_address`` or a local Ray.
    ``min_anchor_cosine``: the preflight (``_preflight``) refuses a shadow whose anchors E(S(z)) have a
    median cosine to the gallery's features below it, before anything is written; None or ``force`` runs
    anyway.
    """
    shadow = _shadow_spec(shadow)
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
        row_bytes = gallery.dim * gallery.dtype.itemsize
        chunk_rows = chunk_rows or batch_size * max(1, CHUNK_BYTES // (row_bytes * batch_size))
        spec = JobSpec(str(src), shadow, encoder, config if config is not None else ProtectConfig(),
                       str(work / "parts"), batch_size, chunk_rows, backend, device, embedding_key, id_key,
                       encoder_arch, encoder_options)
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_cudnn())
            ray = None
            if engine == "ray":
                from .distributed import ray_session

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
            manifest.drop_broken_parts(job, recompute=ray is None)  # the Ray driver's model is not the actors'
            resumed = len(manifest.chunks)
            try:
                _compute(job, spec, manifest, on_bad_rows, ray, workers, progress)
                result = assemble(gallery, manifest, job.num_chunks, fmt, dst, on_bad_rows, progress,
                                  job.protector.stats, fit)
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
        from .distributed import use_gpus

        spec.device = "cuda" if use_gpus(ray, spec.device) else "cpu"  # what the Ray actors use
        job = ChunkJob(dataclasses.replace(spec, device="cpu", backend="reference"), gallery)
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
        "config": spec.config.to_dict(),
        "engine": {**engine, "advface_engine": __version__, "torch": torch.__version__, **_kernel_versions(engine)},
        "layout": {"chunk_rows": spec.chunk_rows, "batch_size": spec.batch_size}, "bad_rows": BAD_ROWS,
    }
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
    return dataclasses.asdict(report)


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
             progress: bool) -> None:
    """Compute the chunks the manifest does not hold yet, here or by Ray actors (built from ``spec``)."""
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
            from .distributed import run_ray

            run_ray(ray, spec, pending, record, workers, spec.device == "cuda", fail)
        elif pending:
            run_local(job, pending, record, fail, progress=bar.update)


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
