"""Gallery files: read rows [start, stop) without loading the whole file, and write a gallery as a stream.

Formats: ``.npy``; ``.safetensors`` (an embeddings tensor and optionally an ids tensor); Parquet (an
embedding list column, an optional id column, other columns carried along, via pyarrow) and FAISS
flat indexes (IndexFlatIP / IndexFlatL2, optionally inside IndexIDMap / IndexIDMap2). npy,
safetensors and FAISS files hold one raw C-order array at a known offset: their headers are parsed
here and rows are read with plain ``pread`` calls, so memory stays flat (no mmap pages pile up in
the resident set), any row range can be read by any worker, and nothing in a file can run code.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RefusedFileError

FORMATS = ("npy", "safetensors", "parquet", "faiss")
RAW_FORMATS = ("npy", "safetensors", "faiss")  # one raw C-order array at a known offset: written in place
SUFFIXES = {".npy": "npy", ".safetensors": "safetensors", ".parquet": "parquet", ".pq": "parquet",
            ".faiss": "faiss", ".index": "faiss"}
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}
FAISS_FLAT = {b"IxFI": 0, b"IxF2": 1}  # fourcc -> metric (0 inner product, 1 L2)
FAISS_IDMAP = (b"IxMp", b"IxM2")
FAISS_HEADER = struct.Struct("<iqqq?i")  # d, ntotal, dummy, dummy, is_trained, metric_type
FAISS_DUMMY = 1 << 20
NPY_LENGTH = {(1, 0): "<H", (2, 0): "<I"}  # .npy versions read, and the format of their header length
NPY_MAX_HEADER = 10_000  # numpy's own limit on a .npy header
PROVENANCE_KEY = "advface_provenance"  # safetensors __metadata__ / Parquet schema metadata key of the job's record


def format_of(path: str | os.PathLike) -> str | None:
    """The format named by a file's suffix, or None."""
    return SUFFIXES.get(Path(path).suffix.lower())


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


def open_npy(path: Path) -> RawGallery:
    """The header parsed with numpy's reader (nothing mapped or allocated from it), checked, and the rows
    read at its offset; ``RawGallery`` checks that the file holds exactly the data the header describes."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":  # else np.load takes it for a pickle and says so
            raise RefusedFileError(f"{path}: not a .npy file (no NumPy header)")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version not in NPY_LENGTH:  # 3.0 only adds unicode field names, which no float array has
                raise ValueError(f"unsupported .npy format version {version}")
            (length,) = struct.unpack(NPY_LENGTH[version], f.read(struct.calcsize(NPY_LENGTH[version])))
            if length > NPY_MAX_HEADER:  # numpy would read (allocate) that much before refusing it
                raise ValueError(f"a header of {length} bytes, more than the {NPY_MAX_HEADER} numpy reads")
            f.seek(8)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f, max_header_size=NPY_MAX_HEADER)
        except Exception as err:  # numpy's header parser raises several types for a damaged header
            raise RefusedFileError(f"{path}: not a readable .npy file ({type(err).__name__}: {err})") from err
        offset = f.tell()
    if len(shape) != 2 or any(n < 0 for n in shape):
        raise ValueError(f"{path}: a gallery .npy must hold one (N, D) array, got shape {shape}")
    if fortran_order and min(shape) > 1:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported; save np.ascontiguousarray(rows)")
    return RawGallery(path, "npy", shape[0], shape[1], dtype, offset)


def _safetensors_header(path: Path) -> tuple[dict, int]:
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


def _safetensors_entry(path: Path, key: str, entry) -> tuple[np.dtype, list[int], int, int]:
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
    header, data_start = _safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RefusedFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {key: _safetensors_entry(path, key, entry) for key, entry in header.items()}
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


class ParquetGallery(Gallery):
    """A Parquet table with an embedding list column; the id and every other column are carried along.

    Reads are streamed with ``iter_batches``; reading chunks in order continues one stream, a jump
    restarts it at the row group that holds the first row (so keep row groups near the chunk size
    when chunks are read out of order, as Ray workers do).
    """

    format = "parquet"

    def __init__(self, path: Path, embedding_key: str | None, id_key: str | None):
        pa = _need("pyarrow", "gallery")
        pq = _need("pyarrow.parquet", "gallery")
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise RefusedFileError(f"{path}: not a readable Parquet file ({err})") from err
        schema = self._file.schema_arrow
        lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                 or pa.types.is_fixed_size_list(f.type)]
        if embedding_key is None:
            if len(lists) != 1:
                raise ValueError(f"{path}: cannot tell which column holds the embeddings (list columns: {lists}); "
                                 "name it with --embedding-key")
            embedding_key = lists[0]
        if embedding_key not in lists:
            raise ValueError(f"{path}: no list column {embedding_key!r} (columns: {schema.names})")
        value_type = schema.field(embedding_key).type.value_type
        try:
            self.dtype = _check_dtype(value_type.to_pandas_dtype(), path)
        except NotImplementedError:
            raise ValueError(f"{path}: unsupported embedding type {value_type}") from None
        self.embedding_key, self.id_key = embedding_key, id_key or "id"
        self.ids_dtype = None
        if self.id_key in schema.names:
            id_type = schema.field(self.id_key).type
            self.ids_dtype = np.dtype(id_type.to_pandas_dtype()) if pa.types.is_integer(id_type) else np.dtype(object)
        self.extra_columns = tuple(n for n in schema.names if n not in (self.embedding_key, self.id_key))
        meta = self._file.metadata
        self.num_rows = meta.num_rows
        self._group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]).tolist()
        self.dim = self._first_dim()
        self._at, self._buffer, self._batches = None, [], None

    def _first_dim(self) -> int:
        field_type = self._file.schema_arrow.field(self.embedding_key).type
        if hasattr(field_type, "list_size"):
            return field_type.list_size
        if self.num_rows == 0:
            return 0
        pa = _need("pyarrow", "gallery")
        try:
            first = next(self._file.iter_batches(batch_size=1, columns=[self.embedding_key])).column(0)[0]
        except (pa.ArrowException, OSError, StopIteration) as err:
            raise RefusedFileError(f"{self.path}: corrupt Parquet data in row 0: {str(err) or 'no rows'}") from err
        if not first.is_valid:
            raise ValueError(f"{self.path}: row 0 has a null embedding")
        return len(first)

    def _table(self, start: int, stop: int):
        import pyarrow as pa

        if start != self._at:
            group = bisect.bisect_right(self._group_starts, start) - 1
            groups = list(range(group, len(self._group_starts) - 1))
            self._batches = self._file.iter_batches(batch_size=16384, row_groups=groups, use_threads=False)
            self._at, self._buffer = self._group_starts[group], []
        have = sum(len(b) for b in self._buffer)
        try:
            while self._at + have < stop:
                batch = next(self._batches, None)
                if batch is None:
                    raise RefusedFileError(f"{self.path}: file ends at row {self._at + have}, expected {self.num_rows}")
                self._buffer.append(batch)
                have += len(batch)
        except (pa.ArrowException, OSError) as err:
            at, self._at = self._at + have, None
            raise RefusedFileError(f"{self.path}: corrupt Parquet data near row {at}: {err}") from err
        table = pa.Table.from_batches(self._buffer, self._file.schema_arrow).slice(start - self._at)
        rest = table.slice(stop - start)
        self._buffer, self._at = rest.to_batches(), stop
        return table.slice(0, stop - start)

    def scan_ids(self, block: int = 1 << 20):
        pa = _need("pyarrow", "gallery")
        batches = self._file.iter_batches(batch_size=block, columns=[self.id_key], use_threads=False)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:
                raise RefusedFileError(f"{self.path}: corrupt Parquet data in the id column: {err}") from err
            if batch is None:
                return
            yield _ids_array(batch.column(0))

    def read(self, start: int, stop: int, rows: bool = True) -> Chunk:
        import pyarrow.compute as pc

        table = self._table(start, stop)
        ids = _ids_array(table.column(self.id_key)) if self.ids_dtype is not None else None
        if not rows:
            return Chunk(None, ids, table)
        column = table.column(self.embedding_key).combine_chunks()
        if column.null_count:
            first = start + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{self.path}: row {first} has a null embedding")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != self.dim).any():
            first = start + int(np.flatnonzero(lengths != self.dim)[0])
            raise ValueError(f"{self.path}: row {first} has {lengths[first - start]} values, expected {self.dim}")
        values = column.flatten().to_numpy(zero_copy_only=False)  # null values become NaN: bad rows
        rows = np.array(values.reshape(len(table), self.dim), dtype=self.dtype, order="C")  # a writable copy
        return Chunk(rows, ids, table)


def _ids_array(column) -> np.ndarray:
    """An Arrow id column as numpy: integers as such; anything else, or with nulls, an object array of
    Python values (None for a missing id; never NaN-filled floats or timestamps turned into integers)."""
    import pyarrow as pa

    if pa.types.is_integer(column.type) and not column.null_count:
        return column.to_numpy(zero_copy_only=False)
    ids = np.empty(len(column), dtype=object)
    ids[:] = column.to_pylist()
    return ids


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


def open_nofollow(path, flags: int) -> int:
    """``open``'s opener that does not follow a link: the job's own files in its folder are never links, so a
    link put in their place (to a file elsewhere) is an error, not a file written or read through."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def npy_header(like: Gallery, num_rows: int, ids_dtype: np.dtype | None,
               provenance: str | None) -> tuple[bytes, bytes]:
    """A .npy file's bytes before its rows (the header of a (num_rows, dim) array) and after them (none)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(like.dtype),
                                                "fortran_order": False, "shape": (num_rows, like.dim)})
    return head.getvalue(), b""


def safetensors_header(like: Gallery, num_rows: int, ids_dtype: np.dtype | None,
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


def faiss_header(like: Gallery, num_rows: int, ids_dtype: np.dtype | None,
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


RAW_HEADERS = {"npy": npy_header, "safetensors": safetensors_header, "faiss": faiss_header}


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
        self.written, self._fd = 0, None  # rows appended by ``write``; the file of a raw format
        if fmt == "parquet":
            self._open_parquet()
            return
        self.row_size = like.dim * like.dtype.itemsize
        row_bytes = num_rows * self.row_size
        head, middle = RAW_HEADERS[fmt](like, num_rows, self.ids_dtype if self.has_ids else None, self.provenance)
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

    def _open_parquet(self) -> None:
        pa = _need("pyarrow", "gallery")
        pq = _need("pyarrow.parquet", "gallery")
        if self.like.format == "parquet":
            schema = self.like._file.schema_arrow
            self._key = self.like.embedding_key
        else:
            fields = [pa.field("id", pa.from_numpy_dtype(self.like.ids_dtype))] if self.has_ids else []
            value = pa.from_numpy_dtype(self.like.dtype)
            schema = pa.schema(fields + [pa.field("embedding", pa.list_(value, self.like.dim))])
            self._key = "embedding"
        if self.provenance:
            schema = schema.with_metadata({**(schema.metadata or {}),
                                           PROVENANCE_KEY.encode(): self.provenance.encode()})
        self._schema = schema
        self._sink = open(self.path, "wb", opener=open_nofollow)
        self._writer = pq.ParquetWriter(self._sink, schema)

    def write(self, chunk: Chunk) -> None:
        """Append a chunk's rows (and ids, and for Parquet its table) after those written before."""
        rows = np.ascontiguousarray(chunk.rows, dtype=self.like.dtype)
        if not len(rows):  # every row of the chunk skipped
            return
        if self.fmt == "parquet":
            self._write_parquet(chunk, rows)
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

    def _write_parquet(self, chunk: Chunk, rows: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        field = self._schema.field(self._key)
        values = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), self.like.dim).cast(field.type)
        if chunk.table is not None:
            if chunk.unchanged is not None and chunk.unchanged.any():  # as read: a null inside a row stays null
                original = chunk.table.column(self._key).combine_chunks()
                values = pc.if_else(pa.array(chunk.unchanged), original, values)
            table = chunk.table.set_column(chunk.table.schema.get_field_index(self._key), field, values)
        else:
            columns = ([pa.array(chunk.ids)] if self.has_ids else []) + [values]
            table = pa.Table.from_arrays(columns, schema=self._schema)
        self._writer.write_table(table, row_group_size=max(len(table), 1))

    def finish(self) -> None:
        """Complete the file, fsync and close it."""
        if self.fmt == "parquet":
            self._writer.close()
            self._sink.flush()
            os.fsync(self._sink.fileno())
            self._sink.close()
            return
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        """Close the file as it is (a job stopped before its end; not Parquet)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
