"""``.safetensors`` galleries: an embeddings tensor and optionally an ids tensor, the header parsed and
checked here (no library reads it) and written; the rows are the raw layout of ``RawGallery``."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ...errors import RefusedFileError
from .base import PROVENANCE_KEY, Gallery, RawGallery, _check_dtype

ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RefusedFileError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise RefusedFileError(f"{path}: not a safetensors file, or truncated (header of {length} bytes, "
                                   f"file {size})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, nested too deep, numbers too long
            raise RefusedFileError(f"{path}: corrupt safetensors header ({type(err).__name__}: {err})") from err
    if not isinstance(header, dict):
        raise RefusedFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + length


def _read_entry(path: Path, key: str, entry) -> tuple[np.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one tensor of a safetensors header, every field checked."""
    if not isinstance(entry, dict):
        raise RefusedFileError(f"{path}: corrupt safetensors header (tensor {key!r} is {str(entry)[:100]!r}, "
                               "not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(type(x) is int and x >= 0 for x in [*shape, *offsets]) and isinstance(dtype, str)):
        raise RefusedFileError(f"{path}: corrupt safetensors header (tensor {key!r}: shape {shape!r}, "
                               f"data_offsets {offsets!r}, dtype {dtype!r})")
    if dtype not in ST_DTYPES:
        raise ValueError(f"{path}: unsupported dtype {dtype} of tensor {key!r}")
    dtype = np.dtype(ST_DTYPES[dtype])
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise RefusedFileError(f"{path}: corrupt safetensors header (tensor {key!r} size does not match its shape)")
    return dtype, shape, begin, end


def open_safetensors(path: Path, embedding_key: str | None, id_key: str | None) -> RawGallery:
    """An embeddings tensor (``embedding_key``, else the only 2-D tensor) and optionally an ids tensor. Every
    tensor's entry is checked, and their data must lie end to end from the start of the data, as
    safetensors writes them (no overlap, no gap)."""
    header, data_start = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RefusedFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {key: _read_entry(path, key, entry) for key, entry in header.items()}
    position = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise RefusedFileError(f"{path}: corrupt safetensors header (tensor {key!r} starts at byte {begin} of "
                                   f"the data, expected {position}: tensors overlap or leave a gap)")
        position = end
    if embedding_key is None:
        matrices = [k for k, (_, shape, _, _) in entries.items() if len(shape) == 2]
        if len(matrices) != 1:
            raise ValueError(f"{path}: cannot tell which tensor holds the embeddings ({sorted(header)}); "
                             "name it with --embedding-key")
        embedding_key = matrices[0]
    id_key = id_key or "ids"
    unknown = set(header) - {embedding_key, id_key}
    if embedding_key not in header:
        raise ValueError(f"{path}: no tensor {embedding_key!r} (tensors: {sorted(header)})")
    if unknown:
        raise ValueError(f"{path}: unsupported extra tensors {sorted(unknown)}; a gallery file holds the "
                         f"embeddings and optionally ids ({id_key!r})")
    dtype, shape, begin, end = entries[embedding_key]
    if len(shape) != 2:
        raise ValueError(f"{path}: tensor {embedding_key!r} must be (N, D), got {shape}")
    ids_offset = ids_dtype = None
    if id_key in entries:
        ids_dtype, ids_shape, ids_begin, _ = entries[id_key]
        if ids_shape != [shape[0]] or ids_dtype.kind not in "iu":
            raise ValueError(f"{path}: ids tensor {id_key!r} must be integer of shape [{shape[0]}], "
                             f"got {ids_dtype} of shape {ids_shape}")
        ids_offset = data_start + ids_begin
    _check_dtype(dtype, path)
    return RawGallery(path, "safetensors", shape[0], shape[1], dtype, data_start + begin, ids_offset, ids_dtype,
                      end=data_start + position, metadata=metadata, embedding_key=embedding_key, id_key=id_key)


def layout(like: Gallery, num_rows: int, ids_dtype: np.dtype | None,
           provenance: str | None) -> tuple[bytes, bytes]:
    """A safetensors file's bytes before its rows (the header: the embeddings tensor and the ids tensor after
    it, under the input's names where it is safetensors, its metadata and the provenance) and after them
    (none)."""
    names = {v: k for k, v in ST_DTYPES.items()}
    info = getattr(like, "info", {}) if like.format == "safetensors" else {}
    key, id_key = info.get("embedding_key", "embeddings"), info.get("id_key", "ids")
    row_bytes = num_rows * like.dim * like.dtype.itemsize
    header: dict = {key: {"dtype": names[like.dtype.type], "shape": [num_rows, like.dim],
                          "data_offsets": [0, row_bytes]}}
    if ids_dtype is not None:
        header[id_key] = {"dtype": names[ids_dtype.type], "shape": [num_rows],
                          "data_offsets": [row_bytes, row_bytes + num_rows * ids_dtype.itemsize]}
    metadata = {**info.get("metadata", {}), **({PROVENANCE_KEY: provenance} if provenance else {})}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, b""
