"""A streaming reader and writer for the safetensors format (no dependency beyond numpy).

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw bytes. Reading memory-maps the file, so one tensor at a time
is materialised; writing streams one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazy access to the tensors of one ``.safetensors`` file."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._offset = 8 + n
        self._data = None

    def names(self):
        return self.entries.keys()

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name) -> np.ndarray:
        """A read-only view of one tensor (no copy until it is transformed)."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        raw = self._data[self._offset + begin : self._offset + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def write(path, tensors, metadata=None):
    """Write ``(name, shape, dtype, produce)`` entries; ``produce()`` returns the array when written.

    The header is built from shapes first, so each array is produced, written and dropped in turn.
    """
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(produce(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(
                    f"tensor {name!r}: produced shape {arr.shape}, header says {shape}"
                )
            f.write(arr.tobytes())
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name
