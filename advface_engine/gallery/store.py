"""The gallery job's durable storage in its folder ``<output>.job``: the one atomic write (``write_atomic``:
temporary file, fsync, rename), where finished chunks are stored (``PartFiles``, or ``OutputInPlace``: the
output's temporary file) and their checksums, the manifest of finished chunks, and the folder itself
(claimed with a marker, locked while a job runs, removed file by file by name).

The job folder is the job's own: made by it, with a marker file (``MARKER``) in it, and locked while
the job runs. The job refuses a folder it cannot take as its own (a link, a folder holding anything
it does not write, or one with neither marker nor the manifest of an older version) and deletes only
the files it writes there, by name, never following a link (``_check_workspace``, ``_remove_job``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import RefusedFileError
from .formats import FORMATS, open_nofollow

if TYPE_CHECKING:
    from .worker import ChunkJob

POLICIES = ("fail", "skip", "copy")  # on_bad_rows: what the job does with bad rows (a manifest's result records it)
MARKER = "advface-job.json"  # written in the job folder when the job makes it: only such a folder is the job's
CREATED_BY = "advface-engine protect-gallery"
# every file the job writes in its folder (output.<format> and compact.<format>, the output written in place
# less the skipped bad rows, included; ids.tmp an older version's), and its parts
AUTO_BASIS = "basis.safetensors"  # keep_out="auto": the basis the job made of its input, kept for a resume
JOB_FILES = frozenset({MARKER, MARKER + ".tmp", "lock", "manifest.json", "manifest.json.tmp", "bad-rows.json.tmp",
                       "provenance.json.tmp", "ids.tmp", AUTO_BASIS, AUTO_BASIS + ".tmp",
                       *(f"{name}.{fmt}" for name in ("output", "compact")
                                                           for fmt in FORMATS)})
PART = re.compile(r"\d{6,}\.bin(\.tmp)?")


def sha256_of(array: np.ndarray) -> str:
    """The sha256 of an array's bytes: what the manifest records of a chunk's input rows and of its part."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


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


class PartFiles:
    """Chunk k's output rows kept in ``parts/<k>.bin`` (``write_part``), the output written from them at
    assembly: for Parquet (a table to write, its other columns read from the input) and on Ray (actors on
    other nodes write their own files)."""

    def __init__(self, folder: Path, dim: int, dtype: np.dtype):
        self.folder, self.dim, self.dtype = folder, dim, dtype

    def save(self, k: int, start: int, rows: np.ndarray, ids: np.ndarray | None) -> str:
        """Write chunk k's rows (rows [start, start + len(rows)) of the output; ids are the input's, kept there)
        durably; their sha256."""
        return write_part(self.folder / f"{k:06d}.bin", rows)

    def load(self, k: int, start: int, stop: int) -> tuple[np.ndarray, None] | None:
        """Chunk k's rows as stored (no ids), or None when its part is missing or truncated."""
        rows = read_part(self.folder / f"{k:06d}.bin", (stop - start, self.dim), self.dtype)
        return None if rows is None else (rows, None)

    def close(self) -> None:
        pass


class OutputInPlace:
    """Chunk k's output rows and ids written straight into the output's temporary file, at their offset
    (``GalleryWriter.write_at``, the file laid out whole, header first): npy, safetensors and FAISS on the
    local engine. When every chunk is done, the file is the output: assembly is an fsync and a rename, not
    a second pass over the data.

    Why this is as durable as part files: a chunk's rows are written and ``fdatasync``ed before the manifest
    records it with their sha256, as a part is; a crash before that leaves it unrecorded (recomputed, its
    bytes overwritten). On resume the recorded chunks' rows are read back from the file and checked as parts
    are (``ChunkJob.holds``: the sha256, bad rows, a batch recomputed) and their ids against the input's, so
    a truncated, damaged or missing file (read as zeros where it was cut) is recomputed chunk by chunk, never
    trusted; the header, which depends on nothing the chunks wrote, is written again whenever the file is
    opened. Part files as well as the file would write the data twice for nothing a resume needs.
    """

    def __init__(self, writer):
        self.writer = writer

    def save(self, k: int, start: int, rows: np.ndarray, ids: np.ndarray | None) -> str:
        """Write chunk k's rows at rows [start, start + len(rows)) of the output, with their ids, durably; the
        rows' sha256."""
        self.writer.write_at(start, rows, ids)
        self.writer.sync()
        return sha256_of(rows)

    def load(self, k: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Rows [start, stop) of the output and their ids (None without ids) as the file holds them, or None
        when it ends before them."""
        try:
            return self.writer.read_at(start, stop)
        except RefusedFileError:
            return None

    def close(self) -> None:
        self.writer.close()


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
