"""PyTorch's zip checkpoint layout (torch >= 1.6): ``<dir>/data.pkl`` plus one member per storage.

The pickle is run by ``sd.io.safe_pickle``; each storage it mentions, ``('storage', type, key, location,
numel)``, is the member ``<dir>/data/<key>`` holding ``numel`` elements in the byte order named by
``<dir>/byteorder`` (little when absent). torch writes members uncompressed and 64-byte aligned, so
they are memory-mapped in place; compressed members (re-zipped files) are read on access, bounded.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sd.errors import CheckpointError
from sd.io.safe_pickle import StorageRef, load_restricted
from sd.io.safetensors_format import FileMap
from sd.io.tensor_dtypes import itemsize

MAX_PICKLE_BYTES = 64 << 20  # SD checkpoints' pickles are ~0.2 MB; this bounds time and memory
MAX_MEMBERS = 100_000  # an SD checkpoint has ~1,200 storages
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032x; more means a lying header
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_PICKLE_NAME = re.compile(r"[^/]+/data\.pkl")


def read_torch_zip(path: Path, file_size: int) -> Any:
    """Unpickle the checkpoint at ``path`` safely; tensors come back as lazy ``TensorRef``s."""
    entries = _declared_entry_count(path, file_size)
    if entries is not None and entries > MAX_MEMBERS:
        raise CheckpointError(path, f"the zip claims {entries} members, far more than a checkpoint has")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(
            path, f"not a readable zip archive ({exc}); the file is truncated or corrupt"
        ) from exc
    with archive, open(path, "rb") as raw:
        members = _members_by_name(path, archive)
        pickle_names = [name for name in members if _PICKLE_NAME.fullmatch(name)]
        if len(pickle_names) != 1:
            raise CheckpointError(
                path,
                "a PyTorch checkpoint holds exactly one '<dir>/data.pkl'; "
                f"found {len(pickle_names)} in this zip, so it is not a torch.save file",
            )
        prefix = pickle_names[0][: -len("data.pkl")]
        byteorder = _byteorder(path, archive, members.get(prefix + "byteorder"))
        storages = _StorageMembers(path, file_size, raw, members, prefix, byteorder)
        data = _read_member(path, archive, members[pickle_names[0]], MAX_PICKLE_BYTES)
        return load_restricted(data, path, pickle_names[0], storages.load)


def _declared_entry_count(path: Path, file_size: int) -> int | None:
    """Member count from the end-of-central-directory record, read before zipfile builds one object
    per member; None when the record is not found (zipfile will then report the damage)."""
    tail_size = min(file_size, 22 + 0xFFFF)  # the record plus the longest possible comment
    with open(path, "rb") as f:
        f.seek(file_size - tail_size)
        tail = f.read(tail_size)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            return None
        count = int.from_bytes(tail[at + 10 : at + 12], "little")
        locator = at - 20
        if count != 0xFFFF or locator < 0 or tail[locator : locator + 4] != b"PK\x06\x07":
            return count
        f.seek(min(int.from_bytes(tail[locator + 8 : locator + 16], "little"), file_size))
        record = f.read(56)  # zip64 end-of-central-directory record
    if len(record) < 40 or record[:4] != b"PK\x06\x06":
        return None
    return int.from_bytes(record[32:40], "little")


def _members_by_name(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if info.filename in members:
            raise CheckpointError(
                path, f"zip member '{info.filename[:200]}' appears twice; the file is corrupt"
            )
        members[info.filename] = info
    return members


def _byteorder(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> str:
    if info is None:
        return "<"
    value = _read_member(path, archive, info, 16)
    if value not in (b"little", b"big"):
        raise CheckpointError(path, f"'{info.filename}' should say 'little' or 'big', not {value[:16]!r}")
    return "<" if value == b"little" else ">"


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read a whole member, refusing sizes above ``limit`` before allocating anything."""
    if info.file_size > limit:
        raise CheckpointError(
            path, f"zip member '{info.filename[:200]}' is {info.file_size} bytes, over the {limit} limit"
        )
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * max(
        info.compress_size, 1
    ):
        raise CheckpointError(
            path, f"zip member '{info.filename[:200]}' claims an impossible compression ratio"
        )
    try:
        with archive.open(info) as member:
            data = member.read(info.file_size + 1)  # bounded even if the header lies
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(
            path, f"cannot read zip member '{info.filename[:200]}' ({exc}); the file is corrupt"
        ) from exc
    except Exception as exc:  # zlib and friends: any other failure is still a corrupt member
        raise CheckpointError(
            path, f"cannot read zip member '{info.filename[:200]}' ({type(exc).__name__}: {exc})"
        ) from exc
    if len(data) != info.file_size:
        raise CheckpointError(
            path,
            f"zip member '{info.filename[:200]}' has {len(data)} bytes, "
            f"not the {info.file_size} its header says",
        )
    return data


class _StorageMembers:
    """Turns storage records from the pickle into ``StorageRef``s over zip members, checking sizes first."""

    def __init__(
        self,
        path: Path,
        file_size: int,
        raw: BinaryIO,
        members: dict[str, zipfile.ZipInfo],
        prefix: str,
        byteorder: str,
    ):
        self.path, self.file_size, self.members = path, file_size, members
        self.prefix, self.byteorder = prefix, byteorder
        self.file = FileMap(path)
        self._raw = raw  # open only while unpickling, to find the members' local headers

    def load(self, dtype: str, key: str, numel: int) -> StorageRef:
        name = f"{self.prefix}data/{key}"
        info = self.members.get(name)
        if info is None:
            raise CheckpointError(
                self.path, f"the pickle refers to storage '{name[:200]}', which is not in the zip"
            )
        nbytes = numel * itemsize(dtype)
        if info.file_size != nbytes:
            raise CheckpointError(
                self.path,
                f"storage '{name[:200]}' should hold {numel} {dtype} ({nbytes} bytes) "
                f"but the zip member has {info.file_size} bytes",
            )
        if info.flag_bits & 0x1:
            raise CheckpointError(self.path, f"storage '{name[:200]}' is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            start = self._data_offset(info)
            return StorageRef(key, dtype, numel, lambda: self.file.bytes_at(start, nbytes), self.byteorder)
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise CheckpointError(
                self.path,
                f"storage '{name[:200]}' uses zip compression {info.compress_type}; "
                "only stored or deflated members are read",
            )
        if nbytes > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
            raise CheckpointError(self.path, f"storage '{name[:200]}' claims an impossible compression ratio")
        return StorageRef(key, dtype, numel, lambda: self._inflate(info), self.byteorder)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        # The central directory gives the local header's offset; the data follows that header.
        try:
            self._raw.seek(info.header_offset)
            header = self._raw.read(_LOCAL_HEADER.size)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                self.path, f"cannot read zip header of '{info.filename[:200]}': {exc}"
            ) from exc
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise CheckpointError(
                self.path,
                f"zip member '{info.filename[:200]}' has a broken local header; the file is corrupt",
            )
        fields = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if info.compress_size != info.file_size or start + info.file_size > self.file_size:
            raise CheckpointError(
                self.path, f"zip member '{info.filename[:200]}' runs past the end of the file (truncated?)"
            )
        return start

    def _inflate(self, info: zipfile.ZipInfo) -> np.ndarray:
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(
                self.path, f"the zip archive can no longer be read ({exc}); was it changed?"
            ) from exc
        with archive:
            data = _read_member(self.path, archive, info, info.file_size)
        return np.frombuffer(data, np.uint8)
