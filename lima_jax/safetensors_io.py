"""Streaming safetensors: read one tensor at a time through a memory map, write one at a time.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading it ourselves keeps bf16 bit-exact (via
ml_dtypes), keeps peak memory at one tensor, and lets a corrupt file fail with its name.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Lazy view of one .safetensors file: `names()`, `shape(name)`, `dtype(name)`, `read(name)`."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: corrupt safetensors header (declared length {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or self._data_start + end > size:
                raise ValueError(f"{path}: tensor {name!r} has offsets that do not match its shape or the file size")
            self._entries[name] = (dtype, shape, begin)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count)
        return data.reshape(shape)


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]] | dict, metadata: dict | None = None,
                      ) -> None:
    """Writes tensors to `path`. Accepts (name, array) pairs or a dict; arrays may be produced lazily by
    a generator, but the header needs every shape first, so pass `(name, shape, dtype, thunk)` via
    `write_safetensors_lazy` for streaming writes."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    specs = [(name, arr.shape, arr.dtype, (lambda a=arr: a)) for name, arr in items]
    write_safetensors_lazy(path, specs, metadata)


def write_safetensors_lazy(path: str, specs: list, metadata: dict | None = None) -> None:
    """specs: [(name, shape, dtype, thunk)]; each thunk is called once, in order, and its array
    written straight to disk, so only one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in specs:
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * int(np.prod(shape))
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, thunk in specs:
            arr = np.asarray(thunk(), dtype=np.dtype(dtype).newbyteorder("<"))
            if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape (1,))
                arr = arr.copy(order="C")
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {arr.shape}, header says {tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # no copy of the tensor


def iter_checkpoint_files(hf_dir: str) -> Iterator[str]:
    """The safetensors files of an HF folder: the index's shards, or the single model.safetensors."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        for name in sorted(set(weight_map.values())):
            yield os.path.join(hf_dir, name)
        return
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        yield single
