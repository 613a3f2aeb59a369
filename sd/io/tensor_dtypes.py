"""Element types that checkpoint files may hold, by one neutral name, and how numpy stores each.

numpy has no bfloat16, so bf16 data is kept as its raw 16-bit pattern (uint16) while reading and
widened to float32 when a tensor is handed out: a bf16 value is the top half of a float32.
"""

from __future__ import annotations

import numpy as np

# neutral name -> numpy type code without byte order ("u2" for bf16: raw bits)
_STORAGE_CODES: dict[str, str] = {
    "float16": "f2",
    "float32": "f4",
    "float64": "f8",
    "bfloat16": "u2",
    "int8": "i1",
    "int16": "i2",
    "int32": "i4",
    "int64": "i8",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "bool": "b1",
}

KNOWN_DTYPES = frozenset(_STORAGE_CODES)


def storage_dtype(name: str, byteorder: str = "<") -> np.dtype:
    """numpy dtype of the bytes as stored in the file (bf16 as uint16 bit patterns)."""
    return np.dtype(byteorder + _STORAGE_CODES[name])


def itemsize(name: str) -> int:
    return storage_dtype(name).itemsize


def result_dtype(name: str) -> np.dtype:
    """numpy dtype of the arrays handed to callers: native byte order, bf16 widened to float32."""
    return np.dtype(np.float32) if name == "bfloat16" else np.dtype(_STORAGE_CODES[name])


def to_result(array: np.ndarray, name: str) -> np.ndarray:
    """Turn stored elements into what callers get: bf16 bits -> float32, foreign byte order -> native."""
    if name == "bfloat16":
        bits = array.astype(np.dtype("=u4")) << np.uint32(16)
        return bits.view(np.float32)
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array
