"""Read and write IDX files, the format the MNIST family of datasets ships in.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order. Files may
be gzip-compressed; we detect that from the content, not the file name.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from greenprop.errors import GreenpropError

_GZIP_MAGIC = b"\x1f\x8b"

# dtype code -> on-disk dtype (multi-byte values are big-endian).
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_NATIVE_TO_CODE = {dtype.newbyteorder("="): code for code, dtype in _CODE_TO_DTYPE.items()}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a writable, native-byte-order array.

    Raises:
        GreenpropError: the file is missing, unreadable, not IDX, truncated, or has
            trailing bytes. The message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise GreenpropError(f"cannot read IDX file {path}: {exc}") from exc
    return parse_idx(data, source=str(path))


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an uncompressed IDX file; `source` names it in errors."""
    if len(data) < 4:
        raise GreenpropError(f"{source} is not an IDX file: only {len(data)} bytes")
    zero0, zero1, code, ndim = data[:4]
    if zero0 or zero1 or code not in _CODE_TO_DTYPE or ndim == 0:
        raise GreenpropError(
            f"{source} is not an IDX file: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000 then a dtype code and a dimension count)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise GreenpropError(f"{source} is truncated: the header needs {header} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _CODE_TO_DTYPE[code]
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise GreenpropError(f"{source} {problem}: shape {shape} needs {expected} bytes, found {len(data)}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # astype copies, which also makes the array writable (frombuffer over bytes is not).
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write `array` as an IDX file; gzip it when `compress` (default: name ends in .gz).

    Useful for building small fake datasets in the same layout as the real ones.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _NATIVE_TO_CODE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise GreenpropError(f"IDX cannot store dtype {array.dtype} (writing {path})")
    if array.ndim == 0 or array.ndim > 255:
        raise GreenpropError(f"IDX needs 1 to 255 dimensions, got {array.ndim} (writing {path})")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data) if compress else data)
    return path
