"""PyTorch's pre-1.6 ``torch.save`` layout: five pickles in a row, then the raw storages.

1. the magic number 0x1950a86a20f9469cfc6c, 2. the protocol version 1001, 3. a ``sys_info`` dict
(byte order, C type sizes), 4. the object itself, whose storages are persistent records
``('storage', type, key, location, numel, view)``, 5. the sorted list of storage keys. Then, for each
key in that order: numel as a little-endian int64, followed by numel elements, little-endian.

Every pickle goes through ``sd.io.safe_pickle``; storage positions are found by walking the 8-byte size
headers (checked against the pickle's numel and the file size) and the data is memory-mapped.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

from sd.errors import CheckpointError
from sd.io.safe_pickle import StorageRef, load_restricted
from sd.io.safetensors_format import FileMap
from sd.io.tensor_dtypes import itemsize

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_PICKLES_BYTES = 64 << 20  # all five pickles must fit in the file's first 64 MiB


def read_torch_legacy(path: Path, file_size: int) -> Any:
    """Unpickle a pre-1.6 checkpoint safely; tensors come back as lazy ``TensorRef``s."""
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(min(file_size, MAX_PICKLES_BYTES)))
    header = [
        _load_plain(path, _next_pickle(path, head), what) for what in ("magic number", "version", "sys_info")
    ]
    magic, version, sys_info = header
    if magic != MAGIC_NUMBER or version != PROTOCOL_VERSION:
        raise CheckpointError(path, f"unknown legacy PyTorch format (magic {magic!r}, version {version!r})")
    if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
        raise CheckpointError(
            path, "the legacy checkpoint's sys_info record is malformed; the file is corrupt"
        )
    if not sys_info["little_endian"]:
        raise CheckpointError(
            path, "legacy checkpoint written on a big-endian machine; convert it to .safetensors"
        )

    layout = _StorageLayout(path, file_size)
    obj = load_restricted(_next_pickle(path, head), path, "the legacy pickle", layout.declare)
    keys = _load_plain(path, _next_pickle(path, head), "storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(path, "the legacy storage key list is malformed; the file is corrupt")
    layout.locate(keys, start=head.tell())
    return obj


def _next_pickle(path: Path, stream: io.BytesIO) -> bytes:
    """Bytes of the pickle starting at the stream's position, found by walking opcodes up to STOP."""
    start = stream.tell()
    try:
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name == "STOP":
                break
    except Exception as exc:  # any parse failure here means a damaged or truncated file
        raise CheckpointError(
            path, f"the legacy checkpoint's pickles are damaged or truncated ({exc})"
        ) from exc
    end = stream.tell()
    return bytes(stream.getbuffer()[start:end])  # copies this pickle only, not the whole head


def _load_plain(path: Path, data: bytes, what: str) -> Any:
    def no_storages(dtype: str, key: str, numel: int) -> StorageRef:
        raise pickle.UnpicklingError(f"the {what} must not refer to storages")

    return load_restricted(data, path, f"the legacy {what}", no_storages)


class _StorageLayout:
    """Storages named by the pickle, placed in the file once the key list is known."""

    def __init__(self, path: Path, file_size: int):
        self.path, self.file_size = path, file_size
        self.file = FileMap(path)
        self.declared: dict[str, tuple[str, int]] = {}
        self.starts: dict[str, int] = {}

    def declare(self, dtype: str, key: str, numel: int) -> StorageRef:
        if numel * itemsize(dtype) > self.file_size:
            raise CheckpointError(self.path, f"storage {key[:100]!r} claims more bytes than the whole file")
        self.declared[key] = (dtype, numel)
        nbytes = numel * itemsize(dtype)
        return StorageRef(key, dtype, numel, lambda: self.file.bytes_at(self.starts[key], nbytes))

    def locate(self, keys: list[str], start: int) -> None:
        if set(keys) != set(self.declared) or len(keys) != len(self.declared):
            raise CheckpointError(
                self.path, "the legacy storage key list does not match the storages the pickle uses"
            )
        position = start
        with open(self.path, "rb") as f:
            for key in keys:
                dtype, numel = self.declared[key]
                f.seek(position)
                size_header = f.read(8)
                if len(size_header) != 8 or int.from_bytes(size_header, "little") != numel:
                    raise CheckpointError(
                        self.path,
                        f"storage {key[:100]!r}: size header does not match the pickle; the file is corrupt",
                    )
                self.starts[key] = position + 8
                position += 8 + numel * itemsize(dtype)
                if position > self.file_size:
                    raise CheckpointError(
                        self.path, f"storage {key[:100]!r} runs past the end of the file (truncated?)"
                    )
