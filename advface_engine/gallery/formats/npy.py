"""``.npy`` galleries: the header read (numpy's own parser, nothing mapped or allocated from it) and written;
the rows are the raw layout of ``RawGallery``."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

from ...errors import RefusedFileError
from .base import Gallery, RawGallery

NPY_LENGTH = {(1, 0): "<H", (2, 0): "<I"}  # .npy versions read, and the format of their header length
NPY_MAX_HEADER = 10_000  # numpy's own limit on a .npy header


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


def layout(like: Gallery, num_rows: int, ids_dtype: np.dtype | None,
           provenance: str | None) -> tuple[bytes, bytes]:
    """A .npy file's bytes before its rows (the header of a (num_rows, dim) array) and after them (none)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(like.dtype),
                                                "fortran_order": False, "shape": (num_rows, like.dim)})
    return head.getvalue(), b""

