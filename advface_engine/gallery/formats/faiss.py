"""FAISS flat index galleries (IndexFlatIP / IndexFlatL2, optionally inside IndexIDMap / IndexIDMap2): their
headers parsed and written as faiss/impl/index_write.cpp does (FAISS itself is not needed); the rows, and
the ids after them, are the raw layout of ``RawGallery``."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ...errors import RefusedFileError
from .base import Gallery, RawGallery

FAISS_FLAT = {b"IxFI": 0, b"IxF2": 1}  # fourcc -> metric (0 inner product, 1 L2)
FAISS_IDMAP = (b"IxMp", b"IxM2")
FAISS_HEADER = struct.Struct("<iqqq?i")  # d, ntotal, dummy, dummy, is_trained, metric_type
FAISS_DUMMY = 1 << 20


def open_faiss(path: Path) -> RawGallery:
    """A FAISS IndexFlatIP / IndexFlatL2 file, optionally in IndexIDMap(2), as faiss/impl/index_write.cpp writes it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def header(fourccs) -> tuple[bytes, int, int, int]:
            raw = f.read(4 + FAISS_HEADER.size)
            if len(raw) < 4 + FAISS_HEADER.size:
                raise RefusedFileError(f"{path}: not a FAISS index, or truncated")
            if raw[:4] not in fourccs:
                raise ValueError(f"{path}: unsupported FAISS index type {raw[:4]!r}; supported: IndexFlatIP, "
                                 "IndexFlatL2, optionally in IndexIDMap / IndexIDMap2")
            d, ntotal, _, _, _, metric = FAISS_HEADER.unpack(raw[4:])
            if d <= 0 or ntotal < 0:
                raise RefusedFileError(f"{path}: corrupt FAISS header (d={d}, ntotal={ntotal})")
            return raw[:4], d, ntotal, metric

        outer = header((*FAISS_FLAT, *FAISS_IDMAP))
        flat = header(tuple(FAISS_FLAT)) if outer[0] in FAISS_IDMAP else outer
        if flat[1:] != outer[1:] or FAISS_FLAT[flat[0]] != flat[3]:
            raise RefusedFileError(f"{path}: corrupt FAISS index (the ID map and its flat index disagree)")
        _, d, ntotal, metric = flat
        raw = f.read(8)
        count = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if count != ntotal * d:
            raise RefusedFileError(f"{path}: corrupt or truncated FAISS index (code size {count}, "
                                   f"expected {ntotal * d})")
        rows_offset = f.tell()
    ids_offset, end = None, rows_offset + ntotal * d * 4
    if outer[0] in FAISS_IDMAP:
        if size < end + 8:
            raise RefusedFileError(f"{path}: FAISS index is truncated")
        with open(path, "rb") as f:
            f.seek(end)
            (n_ids,) = struct.unpack("<Q", f.read(8))
        if n_ids != ntotal:
            raise RefusedFileError(f"{path}: corrupt FAISS ID map ({n_ids} ids for {ntotal} vectors)")
        ids_offset, end = end + 8, end + 8 + 8 * ntotal
    return RawGallery(path, "faiss", ntotal, d, np.float32, rows_offset, ids_offset,
                      np.int64 if ids_offset else None, end=end, metric=metric, idmap=outer[0])


def layout(like: Gallery, num_rows: int, ids_dtype: np.dtype | None,
           provenance: str | None) -> tuple[bytes, bytes]:
    """A FAISS flat index's bytes before its rows (the ID map's header where it has ids, the flat index's, the
    code count) and after them (the id count, before the ids), as faiss/impl/index_write.cpp writes them;
    the input's metric and ID map type where it is FAISS."""
    info = getattr(like, "info", {}) if like.format == "faiss" else {}
    metric = info.get("metric", 0)
    fourcc = {0: b"IxFI", 1: b"IxF2"}[metric]
    header = FAISS_HEADER.pack(like.dim, num_rows, FAISS_DUMMY, FAISS_DUMMY, True, metric)
    flat = fourcc + header + struct.pack("<Q", num_rows * like.dim)
    if ids_dtype is None:
        return flat, b""
    return info.get("idmap", b"IxMp") + header + flat, struct.pack("<Q", num_rows)

