"""What the gallery formats share: a ``Chunk`` of rows, the ``Gallery`` a reader opens, and the raw layout of
npy, safetensors and FAISS files (``RawGallery``: one C-order array of rows at a known offset, read with plain
``pread`` calls, so memory stays flat, no mmap pages pile up in the resident set, any row range can be read
by any worker, and nothing in a file can run code), with the file helpers their readers and writers use.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import RefusedFileError

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
PROVENANCE_KEY = "advface_provenance"  # safetensors __metadata__ / Parquet schema metadata key of the job's record


def _need(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(f"this gallery format needs {module}: pip install 'advface-engine[{extra}]'") from err


def _check_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES or not dtype.isnative:
        raise ValueError(f"{path}: unsupported dtype {dtype}; embeddings must be native float16, float32 or float64")
    return dtype



@dataclass
class Chunk:
    """Rows [start, stop) of a gallery: embeddings (n, D), ids (n,) or None, and for Parquet the whole table slice."""

    rows: np.ndarray | None
    ids: np.ndarray | None = None
    table: object = None
    unchanged: np.ndarray | None = None  # rows to write exactly as read (bad rows under "copy")

    def take(self, keep: np.ndarray) -> Chunk:
        """Only the rows where ``keep`` is True."""
        table = self.table.filter(_need("pyarrow", "gallery").array(keep)) if self.table is not None else None
        unchanged = self.unchanged[keep] if self.unchanged is not None else None
        return Chunk(self.rows[keep], self.ids[keep] if self.ids is not None else None, table, unchanged)


class Gallery:
    """An open gallery file: ``num_rows`` x ``dim`` embeddings of ``dtype``, optional ids, random-access ``read``."""

    format: str
    path: Path
    num_rows: int
    dim: int
    dtype: np.dtype
    ids_dtype: np.dtype | None = None
    extra_columns: tuple[str, ...] = ()
    _fd: int | None = None

    def read(self, start: int, stop: int, rows: bool = True) -> Chunk:
        """Rows [start, stop); with ``rows=False`` only their ids (and Parquet table), rows None."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Size plus a sha256 of the first 64 KiB (the header) and 64 evenly spaced 4 KiB samples.

        Cheap on any size; a change between samples is still caught, because every chunk's input
        checksum is recorded and checked again when the output is assembled.
        """
        size = self.path.stat().st_size
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            digest.update(f.read(1 << 16))
            for offset in np.linspace(0, max(size - 4096, 0), 64).astype(np.int64):
                f.seek(int(offset))
                digest.update(f.read(4096))
        return {"format": self.format, "size": size, "sample_sha256": digest.hexdigest(), "rows": self.num_rows,
                "dim": self.dim, "dtype": self.dtype.name}

    def scan_ids(self, block: int = 1 << 20):
        """The ids in blocks of ``block`` rows (numpy arrays; a missing id is None in an object array)."""
        for start in range(0, self.num_rows, block):
            yield self.read(start, min(start + block, self.num_rows), rows=False).ids

    def close(self) -> None:
        pass


def _pwrite(fd: int, data, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread(fd: int, out: np.ndarray, offset: int, path: Path) -> np.ndarray:
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise RefusedFileError(f"{path}: file is truncated (ends inside the data)")
        done += n
    return out


class RawGallery(Gallery):
    """A gallery stored as raw C-order rows at ``rows_offset`` (npy, safetensors, FAISS), ids at ``ids_offset``."""

    def __init__(self, path: Path, fmt: str, num_rows: int, dim: int, dtype, rows_offset: int,
                 ids_offset: int | None = None, ids_dtype=None, end: int | None = None, **info):
        self.path, self.format, self.num_rows, self.dim = path, fmt, int(num_rows), int(dim)
        self.dtype = _check_dtype(dtype, path)
        self.rows_offset, self.ids_offset = rows_offset, ids_offset
        self.ids_dtype = np.dtype(ids_dtype) if ids_dtype is not None else None
        self.info = info
        size = path.stat().st_size
        end = end if end is not None else rows_offset + self.num_rows * self.dim * self.dtype.itemsize
        if size < end:
            raise RefusedFileError(f"{path}: file is truncated ({size} bytes, the header describes {end})")
        if size > end:
            raise RefusedFileError(f"{path}: file is corrupt ({size - end} bytes beyond what the header describes)")
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, start: int, stop: int, rows: bool = True) -> Chunk:
        data = ids = None
        if rows:
            data = _pread(self._fd, np.empty((stop - start, self.dim), self.dtype),
                          self.rows_offset + start * self.dim * self.dtype.itemsize, self.path)
        if self.ids_offset is not None:
            ids = _pread(self._fd, np.empty(stop - start, self.ids_dtype),
                         self.ids_offset + start * self.ids_dtype.itemsize, self.path)
        return Chunk(data, ids)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_nofollow(path, flags: int) -> int:
    """``open``'s opener that does not follow a link: the job's own files in its folder are never links, so a
    link put in their place (to a file elsewhere) is an error, not a file written or read through."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)
