"""Parquet galleries (via pyarrow): an embedding list column, an optional id column and any other columns,
carried along; read as a stream of row groups and written table by table."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np

from ...errors import RefusedFileError
from .base import PROVENANCE_KEY, Chunk, Gallery, _check_dtype, _need, open_nofollow


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


class ParquetSink:
    """Writes a Parquet gallery of rows shaped like ``like`` to ``path`` (opened without following a link),
    table by table: the input's schema where it is Parquet (its other columns carried along), else an
    ``id`` column (where it has ids) and an ``embedding`` fixed-size list column. ``provenance``: JSON text
    added to the schema's metadata under PROVENANCE_KEY (beside what the input's held)."""

    def __init__(self, path: Path, like: Gallery, provenance: str | None):
        pa = _need("pyarrow", "gallery")
        pq = _need("pyarrow.parquet", "gallery")
        self.like, self.has_ids = like, like.ids_dtype is not None
        if like.format == "parquet":
            schema = like._file.schema_arrow
            self._key = like.embedding_key
        else:
            fields = [pa.field("id", pa.from_numpy_dtype(like.ids_dtype))] if self.has_ids else []
            value = pa.from_numpy_dtype(like.dtype)
            schema = pa.schema(fields + [pa.field("embedding", pa.list_(value, like.dim))])
            self._key = "embedding"
        if provenance:
            schema = schema.with_metadata({**(schema.metadata or {}), PROVENANCE_KEY.encode(): provenance.encode()})
        self._schema = schema
        self._sink = open(path, "wb", opener=open_nofollow)
        self._writer = pq.ParquetWriter(self._sink, schema)

    def write(self, chunk: Chunk, rows: np.ndarray) -> None:
        """A chunk's rows (``rows``, in the gallery's dtype) as a row group: its table with the embedding
        column replaced (rows to write as read, ``chunk.unchanged``, kept as they were), or ids and rows."""
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
        """Write the footer, fsync and close the file."""
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
