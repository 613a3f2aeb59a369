"""Open a weights file (.safetensors, or a PyTorch .ckpt/.pt/.pth/.bin) as a read-only mapping.

The format is decided by the file's first bytes, not its extension, so a misnamed file still loads.
Nothing from the file is executed (see sd/io/safe_pickle.py), tensor data is memory-mapped where the
format allows, and every way a file can be wrong ends in ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from sd.errors import CheckpointError
from sd.io.safe_pickle import TensorRef
from sd.io.safetensors_format import read_safetensors
from sd.io.torch_legacy import read_torch_legacy
from sd.io.torch_zip import read_torch_zip

# torch.save before 1.6 wrote a bare pickle starting with this number as a protocol-2 LONG1.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Wrapper keys that hold the real state dict in training checkpoints. BasicSR / Real-ESRGAN files keep the EMA
# weights (the ones to run) in "params_ema", sometimes with the raw ones beside them in "params": EMA wins.
_WRAPPER_KEYS = ("state_dict", "model", "module", "params_ema", "params-ema", "params", "net")


class _Entry(Protocol):
    dtype: str
    shape: tuple[int, ...]

    @property
    def result_dtype(self) -> np.dtype: ...

    def read(self) -> np.ndarray: ...


class TensorFile(Mapping[str, np.ndarray]):
    """Read-only ``name -> np.ndarray`` over one weights file, in PyTorch layout; bf16 comes back as float32.

    Arrays are produced on access (memory-mapped views where possible), so iterating keys or asking
    ``shape``/``dtype`` reads no tensor data. A missing name raises ``KeyError`` as any Mapping does.
    """

    def __init__(self, path: Path, entries: Mapping[str, _Entry], metadata: Mapping[str, str],
                 format: str = "pytorch"):
        self.path = path
        self.metadata = dict(metadata)
        self._entries = dict(entries)
        self.format = format  # "safetensors", or "pytorch" (a zip or legacy torch file, read safely)

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        try:
            return entry.read()
        except CheckpointError:
            raise
        except Exception as exc:  # e.g. an I/O error from a file that changed under us
            raise CheckpointError(
                self.path, f"cannot read tensor '{key}': {type(exc).__name__}: {exc}"
            ) from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, {len(self)} tensors)"

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> np.dtype:
        """dtype of the array ``self[key]`` returns (float32 for bf16 data)."""
        return self._entries[key].result_dtype

    def stored_dtype(self, key: str) -> str:
        """Element type as stored in the file: 'float16', 'bfloat16', 'float32', ..."""
        return self._entries[key].dtype


def open_tensors(path: str | os.PathLike) -> TensorFile:
    """Open ``path`` by content sniffing; raises ``CheckpointError`` for anything unreadable."""
    path = Path(path)
    file_size = _check_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(path, f"cannot open the file: {exc.strerror or exc}") from exc
    try:
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            return TensorFile(path, _state_dict(path, read_torch_zip(path, file_size)), {})
        if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
            return TensorFile(path, _state_dict(path, read_torch_legacy(path, file_size)), {})
        # before the bare-pickle test: a safetensors header length whose low byte is 0x80 starts like a pickle
        if len(head) >= 9 and head[8:9] == b"{":
            entries, metadata = read_safetensors(path, file_size)
            return TensorFile(path, entries, metadata, format="safetensors")
        if head.startswith(b"\x80"):
            raise CheckpointError(
                path, "this is a bare pickle, not a PyTorch zip checkpoint or safetensors file"
            )
    except CheckpointError:
        raise
    except Exception as exc:  # a hostile file must never surface as some library's exception type
        raise CheckpointError(
            path, f"unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    raise CheckpointError(
        path,
        "not a checkpoint: expected a .safetensors file or a PyTorch zip (.ckpt/.pt), "
        f"but it starts with {head[:12]!r}",
    )


def load_pickled(path: str | os.PathLike) -> object:
    """The whole object a PyTorch `.pt`/`.ckpt`/`.bin` file pickles (zip or legacy), tensors as lazy
    ``TensorRef``s (``.read()`` gives the array), through the same restricted unpickler: for files that are
    not a flat state dict, such as A1111 hypernetworks ({768: (state dict, state dict), "activation_func"})
    and textual-inversion embeddings. ``CheckpointError`` for anything else, including a safetensors file."""
    path = Path(path)
    file_size = _check_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(path, f"cannot open the file: {exc.strerror or exc}") from exc
    try:
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            return read_torch_zip(path, file_size)
        if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
            return read_torch_legacy(path, file_size)
    except CheckpointError:
        raise
    except Exception as exc:  # a hostile file must never surface as some library's exception type
        raise CheckpointError(path, f"unreadable file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    raise CheckpointError(path, f"not a PyTorch .pt file (a zip or legacy pickle); it starts with "
                                f"{head[:12]!r}")


def _check_file(path: Path) -> int:
    try:
        if path.is_dir():
            raise CheckpointError(path, "is a directory; give the path of a .safetensors or .ckpt file")
        if path.exists() and not path.is_file():  # a pipe or device could block or never end
            raise CheckpointError(
                path, "is not a regular file; give the path of a .safetensors or .ckpt file"
            )
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise CheckpointError(path, "file not found; check the path and the models folder") from exc
    except OSError as exc:
        raise CheckpointError(path, f"cannot open the file: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes); the download or copy probably failed")
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, "the file is not readable (permission denied)")
    return size


def _state_dict(path: Path, obj: object) -> dict[str, TensorRef]:
    """Find the tensors in an unpickled checkpoint: unwrap training wrappers, drop non-tensor entries."""
    if not isinstance(obj, dict):
        what = "single tensor" if isinstance(obj, TensorRef) else type(obj).__name__
        raise CheckpointError(path, f"the checkpoint holds a {what}, not a dict of named tensors")
    for _ in range(len(_WRAPPER_KEYS) + 1):
        inner = obj.get("state_dict")
        if isinstance(inner, dict):  # PyTorch Lightning: {"state_dict": ..., "global_step": ..., ...}
            obj = inner
            continue
        if not _has_tensors(obj):
            wrapped = [
                v for k, v in obj.items() if k in _WRAPPER_KEYS and isinstance(v, dict) and _has_tensors(v)
            ]
            ema = obj.get("params_ema")
            if len(wrapped) == 1 or (isinstance(ema, dict) and _has_tensors(ema)):
                obj = wrapped[0] if len(wrapped) == 1 else ema
                continue
        break
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, TensorRef)}


def _has_tensors(obj: dict) -> bool:
    return any(isinstance(v, TensorRef) for v in obj.values())
