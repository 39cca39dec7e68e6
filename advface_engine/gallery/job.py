"""Re-protect a stored gallery: streamed, resumable after ``kill -9``, byte-identical, refusing foreign manifests.

The gallery is cut into chunks of ``chunk_rows`` rows, protected in batches of ``batch_size``. Each
finished chunk is written to ``<output>.job/parts/<k>.bin`` (temporary file + fsync + rename) and
recorded in ``<output>.job/manifest.json`` (rewritten atomically) with the sha256 of its input rows
and of its output bytes. When every chunk is done the output is assembled from the parts in the
target format, in a temporary file renamed onto ``output``; then the job folder is removed.

A rerun of the same command checks the recorded parts against their checksums, skips them and
computes the rest with the same chunk and batch layout, so its output is byte-identical to an
uninterrupted run. On a GPU that needs deterministic kernels: cuDNN is held to its deterministic
algorithms for the job (``deterministic_cudnn``; the fused kernels use no atomics).

The manifest holds a fingerprint of the input (size and a hash of its header and sampled blocks),
the models (checksums of their architecture and weights), the config, the engine and the layout; a rerun
whose fingerprint differs is refused. If the input's size or mtime changed
since the job began, every chunk's input checksum is checked again before the output is written.

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
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ProtectConfig
from ..devices import resolve_device
from ..models import load_encoder
from ..models.io import load_model, model_checksum
from ..progress import progress_bar
from ..protect import Protector
from .formats import Chunk, Gallery, GalleryWriter, check_convertible, format_of, open_gallery

POLICIES = ("fail", "skip", "copy")
ENGINES = ("local", "ray")
CHUNK_BYTES = 32 << 20  # default chunk: about 32 MiB of rows, a multiple of the batch size


@dataclass
class JobSpec:
    """What a worker needs to protect chunks (picklable, for Ray actors)."""

    input: str
    shadow: str | nn.Module
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
    cosine: dict | None = None  # {"mean", "min"} of cos(z, protected z) over the protected rows: a sanity check


BAD_ROWS = "NaN, Inf or all zero"  # in the fingerprint: a job is resumed only under the same rule


def bad_rows_of(rows: np.ndarray) -> np.ndarray:
    """Indices of the rows that are not protected: any NaN or Inf, or all zero. A zero row has no
    direction (a placeholder, e.g. a failed enrolment); protected, every such row would become the
    same unit vector and match the others, and probes, where before it matched nothing."""
    return np.flatnonzero(~np.isfinite(rows).all(axis=1) | ~rows.any(axis=1))


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
        self.shadow = _load(spec.shadow, self.device, load_model)
        self.encoder = _load(spec.encoder, self.device,
                             lambda path, device: load_encoder(path, spec.encoder_arch, device))
        self.protector = Protector(shadow=self.shadow, encoder=self.encoder, config=spec.config, backend=spec.backend)
        self.parts = Path(spec.parts)
        self.num_chunks = -(-self.gallery.num_rows // spec.chunk_rows)

    def bounds(self, k: int) -> tuple[int, int]:
        start = k * self.spec.chunk_rows
        return start, min(start + self.spec.chunk_rows, self.gallery.num_rows)

    def check_dim(self) -> None:
        """One zero row through the Protector: models that do not fit the gallery (or each other: a
        decoder given as the encoder) fail here, before any work."""
        try:
            self.protector(torch.zeros(1, self.gallery.dim, device=self.device))
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{self.gallery.path}: the shadow decoder and encoder cannot protect the gallery's "
                             f"{self.gallery.dim}-d rows: {err}") from err

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
        bad = bad_rows_of(rows)
        good = np.ones(len(rows), dtype=bool)
        good[bad] = False
        record = {"start": start, "stop": stop, "input_sha256": loaded.input_sha256, "bad": bad.tolist()}
        if bad.size and fail:  # found before any work (_refuse_bad_rows): here only if the input changed since
            return record, None
        if not bad.size:
            out = np.empty_like(rows)
            self.protect(loaded.z, out, progress)
            return {**record, "cosine": cosine_stats(rows, out)}, out
        out, protected = rows.copy(), np.empty((len(rows) - bad.size, rows.shape[1]), rows.dtype)
        self.protect(loaded.z[torch.from_numpy(good)], protected, progress)
        out[good] = protected
        if progress is not None:
            progress(bad.size)  # bad rows are kept unchanged
        return {**record, "cosine": cosine_stats(rows[good], protected)}, out

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


def cosine_stats(z: np.ndarray, protected: np.ndarray) -> list:
    """[sum, min, count] of cos(z_i, protected_i) over the rows, for the job's summary (in float64,
    a block of rows at a time: whole-chunk float64 copies would be the job's largest allocation)."""
    if not len(z):
        return [0.0, None, 0]
    cos, block = np.empty(len(z)), 4096
    for i in range(0, len(z), block):
        a, b = z[i:i + block].astype(np.float64), protected[i:i + block].astype(np.float64)
        cos[i:i + block] = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return [float(cos.sum()), float(cos.min()), len(cos)]


def _cosine_summary(records: list[dict]) -> dict | None:
    stats = [r["cosine"] for r in records if r.get("cosine") and r["cosine"][2]]
    if not stats:
        return None
    return {"mean": sum(s[0] for s in stats) / sum(s[2] for s in stats), "min": min(s[1] for s in stats)}


def write_part(path: Path, rows: np.ndarray) -> str:
    """Write rows' bytes to ``path`` (temporary file, fsync, rename); return their sha256."""
    data = memoryview(np.ascontiguousarray(rows)).cast("B")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read_part(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    """A part's rows, or None when it is missing or has the wrong size."""
    rows = np.empty(shape, dtype)
    try:
        with open(path, "rb") as f:
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


class Manifest:
    """``manifest.json``: the job's fingerprint and its finished chunks, rewritten atomically on every change."""

    def __init__(self, work: Path, fingerprint: dict, input_stat: dict, chunks: dict | None = None,
                 final: dict | None = None):
        self.work, self.path = work, work / "manifest.json"
        self.fingerprint, self.input_stat, self.chunks, self.final = fingerprint, input_stat, chunks or {}, final

    @classmethod
    def open(cls, work: Path, fingerprint: dict, input_path: Path) -> Manifest:
        """The job's manifest, created if new; one written for a different fingerprint is refused.

        A new manifest also keeps the input's size and mtime, which tell at assembly whether the input
        may have changed since the job began (then every chunk's input checksum is checked again).
        """
        fingerprint = _plain(fingerprint)
        path = work / "manifest.json"
        if not path.exists():
            (work / "parts").mkdir(parents=True, exist_ok=True)
            manifest = cls(work, fingerprint, _input_stat(input_path))
            manifest.save()
            return manifest
        try:
            data = json.loads(path.read_text())
            chunks = {int(k): v for k, v in data["chunks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is corrupt ({err!r}); delete {work} to start over") from err
        differ = _differences(fingerprint, data.get("fingerprint") or {})
        if differ:
            raise ValueError(f"{path} belongs to a different job ({', '.join(differ)} differ); rerun with the same "
                             f"input, models and settings to resume it, or delete {work} to start over")
        (work / "parts").mkdir(exist_ok=True)
        return cls(work, fingerprint, data.get("input_stat"), chunks, data.get("final"))

    def save(self) -> None:
        tmp = self.path.with_name("manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "input_stat": self.input_stat, "chunks": self.chunks,
                       "final": self.final}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, k: int, record: dict) -> None:
        self.chunks[k] = record
        self.save()

    def drop_broken_parts(self, dim: int, dtype: np.dtype) -> int:
        """Forget finished chunks whose part file is missing or fails its checksum (they are recomputed)."""
        broken = []
        for k, rec in self.chunks.items():
            rows = read_part(self.work / "parts" / f"{k:06d}.bin", (rec["stop"] - rec["start"], dim), dtype)
            if rows is None or sha256_of(rows) != rec["sha256"]:
                broken.append(k)
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


def _bad_rows_error(path: Path, rows: list[int], listed: Path | None = None) -> ValueError:
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    where = f"; all listed in {listed}" if listed is not None else ""
    return ValueError(f"{path}: rows {rows[:10]}{more} have NaN or Inf values or are all zero (--on-bad-rows "
                      f"fail{where}); rerun with --on-bad-rows skip to drop them or copy to keep them unchanged "
                      "(both record them)")


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
    _write_json(side, report, tmp or side.with_name(side.name + ".tmp"))
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


def _write_json(path: Path, data: dict, tmp: Path) -> None:
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def assemble(gallery: Gallery, manifest: Manifest, num_chunks: int, fmt: str, output: Path, policy: str,
             progress: bool = True) -> GalleryResult:
    """Write the output from the parts, rename it onto ``output``, remove the job folder.

    Parts were checksummed when written or when the job resumed. The input is read again only for
    what the output carries along (ids, Parquet columns), unless it may have changed since the job
    began: then every chunk's rows are read and checked against their recorded checksum.
    """
    work, records = manifest.work, [manifest.chunks[k] for k in range(num_chunks)]
    changed = _input_stat(gallery.path) != manifest.input_stat
    carried = gallery.ids_dtype is not None or gallery.format == "parquet"
    num_bad = sum(len(r["bad"]) for r in records)
    tmp = work / f"output.{fmt}"
    writer = GalleryWriter(fmt, tmp, gallery, gallery.num_rows - (num_bad if policy == "skip" else 0), work)
    bad_rows, bad_ids = [], []
    for k, rec in enumerate(progress_bar(records, progress=progress, desc="assemble", unit="chunk")):
        rows = read_part(work / "parts" / f"{k:06d}.bin", (rec["stop"] - rec["start"], gallery.dim), gallery.dtype)
        if rows is None:
            manifest.chunks.pop(k)
            manifest.save()
            raise ValueError(f"{work}/parts/{k:06d}.bin is missing or truncated; rerun to recompute that chunk")
        chunk = gallery.read(rec["start"], rec["stop"], rows=changed) if changed or carried else Chunk(None)
        if changed and sha256_of(chunk.rows) != rec["input_sha256"]:
            raise ValueError(f"{gallery.path}: rows {rec['start']}..{rec['stop'] - 1} changed after they were "
                             f"protected (the input was modified during the job); delete {work} to start over")
        chunk = Chunk(rows, chunk.ids, chunk.table)
        if rec["bad"]:
            bad = np.asarray(rec["bad"], dtype=np.int64)
            bad_rows += (rec["start"] + bad).tolist()
            if chunk.ids is not None:
                bad_ids += [_json_id(i) for i in chunk.ids[bad].tolist()]
            if policy == "skip":
                keep = np.ones(len(rows), dtype=bool)
                keep[bad] = False
                chunk = chunk.take(keep)
            else:
                chunk.unchanged = np.zeros(len(rows), dtype=bool)
                chunk.unchanged[bad] = True
        writer.write(chunk)
    writer.finish()
    side = output.with_name(output.name + ".bad-rows.json")
    if bad_rows:
        _write_bad_rows(output, gallery, policy, bad_rows, bad_ids, work / "bad-rows.json.tmp")
    elif side.exists():
        side.unlink()
    cosine = _cosine_summary(records)
    result = GalleryResult(output, fmt, gallery.num_rows, writer.num_rows, len(bad_rows), num_chunks, 0,
                           side if bad_rows else None, cosine)
    manifest.final = {**_stat(tmp), "result": {"format": fmt, "policy": policy, "rows_written": writer.num_rows,
                                               "bad_rows": len(bad_rows), "bad_rows_file": bad_rows and str(side),
                                               "cosine": cosine}}
    manifest.save()
    os.replace(tmp, output)
    _remove_job(work)
    return result


def _input_stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stat(path: Path) -> dict:
    st = path.stat()  # a rename keeps all three: they identify the assembled file under its final name
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remove_job(work: Path) -> None:
    """Parts first, the manifest (which knows the output is final) last, so an interrupted cleanup can finish."""
    shutil.rmtree(work / "parts", ignore_errors=True)
    for path in sorted(work.iterdir(), key=lambda p: p.name == "manifest.json"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    work.rmdir()


@contextlib.contextmanager
def _locked(work: Path):
    """An exclusive lock on the job folder: a second process on the same output stops with a clear error."""
    import fcntl

    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another job is running on {work}") from None
        yield


def protect_gallery(
    input: str | os.PathLike,
    output: str | os.PathLike,
    shadow: str | os.PathLike | nn.Module,
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
    overwrite: bool = False,
    progress: bool = True,
) -> GalleryResult:
    """Replace every embedding of a stored gallery by its protected feature (ALGORITHM.md), streamed and resumable.

    shadow, encoder: checkpoint paths (``save_model``) or modules; the encoder may also be any file
    ``load_encoder`` takes (ONNX; a state dict with ``encoder_arch``). ``format``: the output's format,
    by default the output's suffix, else the input's. ``chunk_rows``: rows per checkpointed chunk
    (default: about 32 MiB of rows, a multiple of ``batch_size``). ``engine="ray"``: Ray Data
    actors, ``workers`` of them (default one per GPU, else per CPU), on ``ray_address`` or a local Ray.
    """
    if on_bad_rows not in POLICIES:
        raise ValueError(f"on_bad_rows must be one of {POLICIES}, got {on_bad_rows!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if (workers is not None or ray_address is not None) and engine != "ray":
        raise ValueError("workers and ray_address are for Ray: they need engine 'ray' (--engine ray)")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
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
    gallery = open_gallery(src, embedding_key, id_key)
    try:
        fmt = format or format_of(dst) or gallery.format
        check_convertible(gallery, fmt)
        row_bytes = gallery.dim * gallery.dtype.itemsize
        chunk_rows = chunk_rows or batch_size * max(1, CHUNK_BYTES // (row_bytes * batch_size))
        spec = JobSpec(str(src), shadow, encoder, config if config is not None else ProtectConfig(),
                       str(work / "parts"), batch_size, chunk_rows, backend, device, embedding_key, id_key,
                       encoder_arch)
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_cudnn())
            ray = None
            if engine == "ray":
                from .distributed import ray_session

                ray = stack.enter_context(ray_session(ray_address, workers))
            job, fingerprint = _prepare(spec, gallery, ray)
            if dst.exists():
                finished = _finished(work, fingerprint, dst, fmt, on_bad_rows)
                if finished is not None:
                    return finished
                if not overwrite:
                    raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
            if on_bad_rows == "fail":
                _refuse_bad_rows(gallery, chunk_rows, dst, progress)
            stack.enter_context(_locked(work))
            manifest = Manifest.open(work, fingerprint, src)
            manifest.drop_broken_parts(gallery.dim, gallery.dtype)
            resumed = len(manifest.chunks)
            try:
                _compute(job, spec, manifest, on_bad_rows, ray, workers, progress)
                result = assemble(gallery, manifest, job.num_chunks, fmt, dst, on_bad_rows, progress)
            except OSError as err:
                if err.filename is None:  # e.g. a full disk while writing: say where
                    raise OSError(err.errno, f"{err.strerror} (writing {work} or {dst}; finished chunks are "
                                             "kept: rerun the same command to resume)") from err
                raise
            return dataclasses.replace(result, resumed_chunks=resumed)
    finally:
        gallery.close()


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
        "shadow": model_checksum(job.shadow), "encoder": model_checksum(job.encoder),  # weights, not file bytes
        "encoder_arch": spec.encoder_arch,
        "config": spec.config.to_dict(), "engine": {**engine, "torch": torch.__version__, **_kernel_versions(engine)},
        "layout": {"chunk_rows": spec.chunk_rows, "batch_size": spec.batch_size}, "bad_rows": BAD_ROWS,
    }
    return job, fingerprint


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
    in this format under this bad-rows policy), else None."""
    try:
        data = json.loads((work / "manifest.json").read_text())
        final = data["final"]
        same_file = {k: final[k] for k in ("ino", "size", "mtime_ns")} == _stat(output)
        same_output = final["result"]["format"] == fmt and final["result"].get("policy") == policy
        if data["fingerprint"] != _plain(fingerprint) or not same_file or not same_output:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _remove_job(work)
    r, chunks = final["result"], len(data["chunks"])
    side = Path(r["bad_rows_file"]) if r["bad_rows_file"] else None
    return GalleryResult(output, r["format"], fingerprint["input"]["rows"], r["rows_written"], r["bad_rows"], chunks,
                         chunks, side, r.get("cosine"))
