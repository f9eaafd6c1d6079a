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

from llmjax.errors import HFCheckpointError

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


FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _fail(path, problem: str) -> HFCheckpointError:
    return HFCheckpointError(
        f"{path}: {problem}; the file is damaged or not safetensors, so download or export it again"
    )


class SafetensorsFile:
    """Lazy access to the tensors of one ``.safetensors`` file.

    The header is checked when the file is opened, against the file's size: every tensor's byte
    range must lie inside the data section, match its shape and dtype, and overlap no other, so
    a truncated or corrupt file fails here, naming the tensor, not later as a wrong weight.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise _fail(self.path, f"{size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise _fail(
                        self.path, f"the header claims {n:,} bytes but the file has {size:,}"
                    )
                blob = f.read(n)
        except OSError as e:
            raise HFCheckpointError(
                f"cannot read {self.path} ({e.strerror or e}); check that it exists and is readable"
            ) from e
        try:
            header = json.loads(blob)
        except ValueError as e:
            raise _fail(self.path, f"its header is not JSON ({e})") from e
        if not isinstance(header, dict):
            raise _fail(self.path, f"its header is a JSON {type(header).__name__}, not an object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._offset = 8 + n
        self._data = None
        self._check(size - self._offset)

    def _check(self, data_bytes: int) -> None:
        spans = []
        for name, e in self.entries.items():
            ok = (
                isinstance(e, dict)
                and isinstance(e.get("dtype"), str)
                and isinstance(e.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in e["shape"])
                and isinstance(e.get("data_offsets"), list)
                and len(e["data_offsets"]) == 2
                and all(isinstance(o, int) for o in e["data_offsets"])
            )
            if not ok:
                raise _fail(self.path, f"the header entry of tensor {name!r} is malformed ({e!r})")
            begin, end = e["data_offsets"]
            if not 0 <= begin <= end:
                raise _fail(self.path, f"tensor {name!r} has data_offsets {[begin, end]}")
            if end > data_bytes:
                raise _fail(
                    self.path,
                    f"truncated: tensor {name!r} needs {end:,} data bytes but the file holds "
                    f"{data_bytes:,}",
                )
            if e["dtype"] in DTYPES:
                want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
                if end - begin != want:
                    raise _fail(
                        self.path,
                        f"tensor {name!r} ({e['dtype']} {e['shape']}) needs {want:,} bytes but "
                        f"its data_offsets span {end - begin:,}",
                    )
            spans.append((begin, end, name))
        reach, last = 0, None  # the furthest end so far, and whose it is
        for begin, end, name in sorted(spans):
            if begin < reach and begin < end:
                raise _fail(self.path, f"tensors {last!r} and {name!r} share bytes")
            if end > reach:
                reach, last = end, name

    def names(self):
        return self.entries.keys()

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name) -> str:
        """The stored dtype's safetensors name (``F32``, ``BF16``, ``I64``...)."""
        return self.entries[name]["dtype"]

    def get(self, name) -> np.ndarray:
        """A read-only view of one tensor (no copy until it is transformed)."""
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise HFCheckpointError(
                f"{self.path}: tensor {name!r} has dtype {e['dtype']}, which llmjax does not read "
                f"(it reads {', '.join(DTYPES)}); convert the checkpoint to float32 or bfloat16"
            )
        dtype = DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        if begin == end:  # numpy cannot map an empty range (nor an empty file)
            return np.empty(e["shape"], dtype)
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._data[self._offset + begin : self._offset + end]
        return raw.view(dtype).reshape(e["shape"])


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
    try:
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name
