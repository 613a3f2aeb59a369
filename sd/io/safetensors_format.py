"""Reading the ``.safetensors`` layout ourselves, so every inconsistency becomes our own error.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data area. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
area) plus an optional ``"__metadata__"`` of string pairs. Tensors must tile the data area exactly:
no gaps, no overlaps, nothing past its end (the reference implementation demands the same).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd.errors import CheckpointError
from sd.io.tensor_dtypes import itemsize, result_dtype, storage_dtype, to_result

# The reference implementation allows 100 MB; SD-family headers are ~0.2 MB, and a 100 MB JSON header
# would cost gigabytes of Python objects, so we stop far lower.
MAX_HEADER_BYTES = 16 << 20

_DTYPES = {
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "BF16": "bfloat16",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}


class FileMap:
    """The whole file mapped read-only once, on first use; slices are views, never copies."""

    def __init__(self, path: Path):
        self.path = path
        self._map: np.memmap | None = None

    def bytes_at(self, start: int, length: int) -> np.ndarray:
        if length == 0:
            return np.empty(0, np.uint8)
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise CheckpointError(self.path, f"cannot memory-map the file: {exc}") from exc
        if start + length > self._map.size:
            raise CheckpointError(self.path, "the file got shorter after it was opened; reopen it")
        return self._map[start : start + length]


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its place in the file and how to read it."""

    file: FileMap
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def result_dtype(self) -> np.dtype:
        return result_dtype(self.dtype)

    def read(self) -> np.ndarray:
        raw = self.file.bytes_at(self.start, self.nbytes)
        return to_result(raw.view(storage_dtype(self.dtype)).reshape(self.shape), self.dtype)


def read_safetensors(path: Path, file_size: int) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Parse and check the header of ``path``; returns (entries by name, ``__metadata__``)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "too short for a safetensors file (no 8-byte header length)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise CheckpointError(
                path,
                f"safetensors header claims {header_len} bytes but the file has {file_size}: "
                "the file is truncated or not a safetensors file",
            )
        header_bytes = f.read(header_len)
    if len(header_bytes) != header_len:
        raise CheckpointError(path, "the file ended inside the safetensors header (truncated)")
    header = _parse_json(path, header_bytes)
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start, data_len = 8 + header_len, file_size - 8 - header_len
    file = FileMap(path)
    entries = {name: _entry(path, file, name, info, data_start) for name, info in header.items()}
    _check_tiling(path, entries, data_start, data_len)
    return entries, metadata


def _parse_json(path: Path, header_bytes: bytes) -> dict:
    def no_duplicates(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a key appears twice")
        return dict(pairs)

    if not header_bytes.startswith(b"{"):
        raise CheckpointError(path, "the safetensors header does not start with '{'; the file is corrupt")
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            path, f"the safetensors header is not valid JSON ({str(exc)[:200]}); the file is corrupt"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, "the safetensors header is not a JSON object")
    return header


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "'__metadata__' in the safetensors header must map strings to strings")
    return metadata


def _entry(path: Path, file: FileMap, name: str, info: object, data_start: int) -> SafetensorsEntry:
    where = f"tensor '{name[:200]}'"
    if not isinstance(info, dict):
        raise CheckpointError(path, f"{where}: header entry is not an object")
    dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(
            path,
            f"{where}: unsupported dtype {str(info.get('dtype'))[:40]!r} (supported: {', '.join(_DTYPES)})",
        )
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _is_int_list(shape) or len(shape) > 64:
        raise CheckpointError(path, f"{where}: 'shape' must be a list of non-negative integers")
    if not _is_int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(path, f"{where}: 'data_offsets' must be [begin, end] with begin <= end")
    nbytes = math.prod(shape) * itemsize(dtype)
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            path,
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets {offsets} "
            f"cover {offsets[1] - offsets[0]}",
        )
    return SafetensorsEntry(file, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _check_tiling(path: Path, entries: dict[str, SafetensorsEntry], data_start: int, data_len: int) -> None:
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].nbytes)):
        if entry.start != position:
            problem = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
            raise CheckpointError(
                path, f"tensor '{name[:200]}': data at byte {entry.start} {problem}; the file is corrupt"
            )
        position += entry.nbytes
    if position != data_start + data_len:
        raise CheckpointError(
            path,
            f"tensors cover {position - data_start} bytes of data but the file holds {data_len}: "
            "it is truncated or has trailing garbage",
        )
