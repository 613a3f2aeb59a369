"""Write a `.safetensors` file from named numpy arrays, one tensor at a time (a 2 GB checkpoint never sits in
memory twice). The caller picks the path; making it appear atomically is the caller's job (a temp file and a
rename: the engine's `ctx.output_file`)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

_TAGS = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
         np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
         np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL"}


def write_safetensors(path: str | Path, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """`shapes`: key -> (shape, dtype) in file order; `produce(key)` gives that array (called once per key,
    in order, so arrays can be made on demand). Data is little-endian, 8-byte aligned after the header."""
    header: dict = {}
    offset = 0
    for key, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype)
        if dtype not in _TAGS:
            raise ValueError(f"{key}: cannot store {dtype} in a safetensors file")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _TAGS[dtype], "shape": [int(n) for n in shape],
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, (shape, dtype) in shapes.items():
            array = np.asarray(produce(key))
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{key}: produced {array.dtype}{array.shape}, "
                                 f"declared {dtype}{tuple(shape)}")
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
