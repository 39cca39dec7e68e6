"""Gallery files: read rows [start, stop) without loading the whole file, and write a gallery as a stream or in
place. One module per format holds its reader and writer: ``npy``, ``safetensors`` (an embeddings tensor and
optionally an ids tensor), ``parquet`` (an embedding list column, an optional id column, other columns
carried along, via pyarrow) and ``faiss`` (flat indexes, IndexFlatIP / IndexFlatL2, optionally inside
IndexIDMap / IndexIDMap2); what they share is in ``base``. npy, safetensors and FAISS files hold one raw
C-order array at a known offset (``RawGallery``): their headers are parsed and written here, and rows are
read with plain ``pread`` calls and written in place with ``pwrite``. This module dispatches on the format:
``format_of``, ``open_gallery``, ``check_convertible`` and ``GalleryWriter``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import faiss, npy, safetensors
from .base import FLOAT_DTYPES, PROVENANCE_KEY, Chunk, Gallery, RawGallery, _pread, _pwrite, open_nofollow
from .faiss import FAISS_DUMMY, FAISS_FLAT, FAISS_HEADER, FAISS_IDMAP, open_faiss
from .npy import NPY_LENGTH, NPY_MAX_HEADER, open_npy
from .parquet import ParquetGallery, ParquetSink
from .safetensors import ST_DTYPES, open_safetensors

__all__ = ["FAISS_DUMMY", "FAISS_FLAT", "FAISS_HEADER", "FAISS_IDMAP", "FLOAT_DTYPES", "FORMATS", "NPY_LENGTH",
           "NPY_MAX_HEADER", "PROVENANCE_KEY", "RAW_FORMATS", "RAW_LAYOUTS", "ST_DTYPES", "SUFFIXES", "Chunk",
           "Gallery", "GalleryWriter", "ParquetGallery", "ParquetSink", "RawGallery", "check_convertible",
           "format_of", "open_faiss", "open_gallery", "open_nofollow", "open_npy", "open_safetensors"]

FORMATS = ("npy", "safetensors", "parquet", "faiss")
RAW_FORMATS = ("npy", "safetensors", "faiss")  # one raw C-order array at a known offset: written in place
SUFFIXES = {".npy": "npy", ".safetensors": "safetensors", ".parquet": "parquet", ".pq": "parquet",
            ".faiss": "faiss", ".index": "faiss"}
# a raw format's bytes before its rows and between its rows and ids, for (like, num_rows, ids_dtype, provenance)
RAW_LAYOUTS = {"npy": npy.layout, "safetensors": safetensors.layout, "faiss": faiss.layout}


def format_of(path: str | os.PathLike) -> str | None:
    """The format named by a file's suffix, or None."""
    return SUFFIXES.get(Path(path).suffix.lower())


def open_gallery(path: str | os.PathLike, embedding_key: str | None = None, id_key: str | None = None) -> Gallery:
    """Open a gallery file by its suffix, check its header, dtype and size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gallery file at {path}")
    fmt = format_of(path)
    if fmt is None:
        raise ValueError(f"{path}: unknown gallery format; suffixes: {sorted(SUFFIXES)}")
    if fmt == "npy":
        gallery = open_npy(path)
    elif fmt == "safetensors":
        gallery = open_safetensors(path, embedding_key, id_key)
    elif fmt == "faiss":
        gallery = open_faiss(path)
    else:
        gallery = ParquetGallery(path, embedding_key, id_key)
    if gallery.dim == 0:
        gallery.close()
        raise ValueError(f"{path}: the gallery's rows have no values ({gallery.num_rows} rows of dim 0)")
    return gallery


def check_convertible(gallery: Gallery, fmt: str) -> None:
    """Refuse an output format that would lose something the input holds (ids, columns, dtype)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == gallery.format:
        return
    if gallery.extra_columns:
        raise ValueError(f"{gallery.path}: columns {list(gallery.extra_columns)} would be lost in {fmt} output")
    if gallery.ids_dtype is not None:
        if fmt == "npy":
            raise ValueError(f"{gallery.path}: the gallery has ids, which .npy output cannot keep; "
                             "use safetensors, parquet or faiss output")
        if gallery.ids_dtype.kind not in "iu" and fmt != "parquet":
            raise ValueError(f"{gallery.path}: {fmt} output needs integer ids, the gallery has {gallery.ids_dtype}")
    if fmt == "faiss" and gallery.dtype != np.float32:
        raise ValueError(f"{gallery.path}: FAISS output holds float32, the gallery is {gallery.dtype}")
    if gallery.ids_dtype is not None and fmt != "parquet":
        _check_ids_fit(gallery, fmt)


def _check_ids_fit(gallery: Gallery, fmt: str) -> None:
    """Refuse ids that safetensors or FAISS output would change: missing ones, and for FAISS (int64
    ids) unsigned ids past 2**63 - 1. Reads the ids only (8 bytes a row), before any work."""
    start = 0
    for ids in gallery.scan_ids():
        if ids.dtype == object:
            missing = [i for i, v in enumerate(ids) if v is None]
            if missing:
                raise ValueError(f"{gallery.path}: row {start + missing[0]} has no id, which {fmt} output cannot "
                                 "hold; keep Parquet output or fill the ids")
        elif fmt == "faiss" and ids.dtype.kind == "u" and len(ids) and ids.max() > np.iinfo(np.int64).max:
            row = start + int(np.argmax(ids > np.iinfo(np.int64).max))
            raise ValueError(f"{gallery.path}: id {ids[row - start]} (row {row}) does not fit FAISS's int64 ids")
        start += len(ids)


class GalleryWriter:
    """Writes a gallery of ``num_rows`` rows shaped like ``like`` to ``path`` (opened without following a link:
    it lives in the job's folder). ``provenance``: a JSON-able record written, as JSON text under
    PROVENANCE_KEY, into a safetensors header's metadata or a Parquet schema's (beside what the input's
    held); npy and FAISS have no room for it.

    npy, safetensors and FAISS files (RAW_FORMATS) are laid out whole when opened: the header, then room
    for every row and id at its offset (a sparse file). ``write_at`` puts rows [start, start + n) and their
    ids in place, in any order, and ``read_at`` reads them back; ``write`` appends chunk after chunk. With
    ``keep`` an existing file's rows and ids are kept and its header written again (a job resumes the output
    it writes in place). Parquet is written chunk after chunk (``write``) only.
    """

    def __init__(self, fmt: str, path: Path, like: Gallery, num_rows: int, provenance: dict | None = None,
                 keep: bool = False):
        self.fmt, self.path, self.like, self.num_rows = fmt, path, like, num_rows
        self.provenance = json.dumps(provenance, sort_keys=True) if provenance is not None else None
        self.has_ids = like.ids_dtype is not None
        self.ids_dtype = np.dtype(np.int64) if fmt == "faiss" else like.ids_dtype
        self.written, self._fd, self._parquet = 0, None, None  # rows appended by ``write``; the file
        if fmt == "parquet":
            self._parquet = ParquetSink(path, like, self.provenance)
            return
        self.row_size = like.dim * like.dtype.itemsize
        row_bytes = num_rows * self.row_size
        head, middle = RAW_LAYOUTS[fmt](like, num_rows, self.ids_dtype if self.has_ids else None, self.provenance)
        self.rows_offset, self.ids_offset = len(head), len(head) + row_bytes + len(middle)
        size = self.ids_offset + (num_rows * self.ids_dtype.itemsize if self.has_ids else 0)
        self._fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | (0 if keep else os.O_TRUNC))
        try:
            os.ftruncate(self._fd, size)
            _pwrite(self._fd, head, 0)
            _pwrite(self._fd, middle, self.rows_offset + row_bytes)
        except BaseException:
            self.close()
            raise

    def write(self, chunk: Chunk) -> None:
        """Append a chunk's rows (and ids, and for Parquet its table) after those written before."""
        rows = np.ascontiguousarray(chunk.rows, dtype=self.like.dtype)
        if not len(rows):  # every row of the chunk skipped
            return
        if self._parquet is not None:
            self._parquet.write(chunk, rows)
        else:
            self.write_at(self.written, rows, chunk.ids)
        self.written += len(rows)

    def write_at(self, start: int, rows: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Rows [start, start + len(rows)) and their ids, at their place in the file (not Parquet)."""
        _pwrite(self._fd, np.ascontiguousarray(rows, dtype=self.like.dtype), self.rows_offset + start * self.row_size)
        if self.has_ids:
            _pwrite(self._fd, np.ascontiguousarray(ids, dtype=self.ids_dtype),
                    self.ids_offset + start * self.ids_dtype.itemsize)

    def read_at(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [start, stop) and their ids (None without ids) as the file holds them (not Parquet); a
        RefusedFileError when the file ends before them."""
        rows = _pread(self._fd, np.empty((stop - start, self.like.dim), self.like.dtype),
                      self.rows_offset + start * self.row_size, self.path)
        if not self.has_ids:
            return rows, None
        return rows, _pread(self._fd, np.empty(stop - start, self.ids_dtype),
                            self.ids_offset + start * self.ids_dtype.itemsize, self.path)

    def sync(self) -> None:
        """What was written so far, on disk (``fdatasync``; not Parquet)."""
        os.fdatasync(self._fd)

    def finish(self) -> None:
        """Complete the file, fsync and close it."""
        if self._parquet is not None:
            self._parquet.finish()
            return
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        """Close the file as it is (a job stopped before its end; not Parquet)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
