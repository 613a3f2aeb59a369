"""A restricted unpickler for the ``data.pkl`` inside PyTorch zip checkpoints.

A pickle is a small program: it names globals (``module.name``) and calls them. Here ``find_class``
never imports or looks anything up by the file's names; it only hands out objects from ``_ALLOWED``,
all written in this module:

* torch's tensor-rebuild functions become functions that build a lazy ``TensorRef`` (a checked view
  description over a storage; no data is read until someone asks for the array),
* torch storage types and dtype objects become inert tokens naming an element type,
* ``torch.nn.ParameterDict`` becomes a plain dict of its tensors (``ParameterDictStandIn``),
* a few harmless globals that real training checkpoints contain (Lightning's ``ModelCheckpoint`` as a
  dict key, numpy scalars for a saved metric, ``_codecs.encode`` for bytes) become inert placeholders.

Anything else raises ``CheckpointError`` naming the global. Before unpickling, the opcode stream is
scanned without executing it so that oversized length fields or memo indices cannot make the C
unpickler allocate gigabytes from a few bytes of input.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sd.errors import CheckpointError
from sd.io.tensor_dtypes import KNOWN_DTYPES, itemsize, result_dtype, storage_dtype, to_result

MAX_DIMS = 64
# Opcodes PyTorch never writes and that only widen what a file can do.
_REFUSED_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"})


@dataclass(frozen=True)
class StorageRef:
    """One raw storage of a checkpoint: ``numel`` elements of ``dtype``, read on demand."""

    key: str
    dtype: str
    numel: int
    read_bytes: Callable[[], np.ndarray]  # flat uint8 array of numel * itemsize(dtype) bytes
    byteorder: str = "<"

    def __setstate__(self, state: object) -> None:  # BUILD must not rewrite a checked object
        raise pickle.UnpicklingError("BUILD on a storage is not allowed")


@dataclass(frozen=True)
class TensorRef:
    """A tensor as a strided view of a storage, already bounds-checked; ``read()`` gives the array."""

    storage: StorageRef
    dtype: str
    offset: int  # in elements of ``dtype``
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements of ``dtype``

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError("BUILD on a tensor is not allowed")

    @property
    def result_dtype(self) -> np.dtype:
        return result_dtype(self.dtype)

    def read(self) -> np.ndarray:
        flat = self.storage.read_bytes().view(storage_dtype(self.dtype, self.storage.byteorder))
        size = itemsize(self.dtype)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * size for s in self.strides),
            writeable=False,
        )
        return to_result(view, self.dtype)


class _Shared:
    """Base of the allow-list's objects, which are shared by every load in the process.

    The BUILD opcode calls ``__setstate__`` or sets attributes on any object; refusing it here keeps
    one hostile file from altering what later files are read with.
    """

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError(f"BUILD on {self!r} is not allowed")

    def __setattr__(self, name: str, value: object) -> None:
        raise pickle.UnpicklingError(f"{self!r} is read-only")


class StorageType(_Shared):
    """Inert token for ``torch.FloatStorage`` & co. and ``torch.float16`` & co.: just an element type."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"StorageType({self.dtype})"


class _Function(_Shared):
    """One of our own functions as handed to the pickle: callable, but not modifiable by it."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., object]):
        object.__setattr__(self, "func", func)

    def __call__(self, *args: object) -> object:
        return self.func(*args)

    def __repr__(self) -> str:
        return f"<allowed {self.func.__name__}>"


class Opaque:
    """Base of inert stand-ins for harmless non-tensor globals; accepts any arguments and state."""

    global_name = "?"

    def __new__(cls, *args: object, **kwargs: object) -> Opaque:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass  # the state is dropped: nothing of it reaches the caller

    def __repr__(self) -> str:
        return f"<placeholder for {self.global_name}>"


class ParameterDictStandIn(dict):
    """``torch.nn.ParameterDict`` (early textual-inversion files keep their vectors in one) read as a plain
    dict of its parameters' tensors: the module is never built, and of its pickled state only the
    ``_parameters`` entries that are tensors are kept."""

    def __setstate__(self, state: object) -> None:
        params = state.get("_parameters") if isinstance(state, dict) else None
        if isinstance(params, dict):
            self.update({k: v for k, v in params.items() if isinstance(k, str) and isinstance(v, TensorRef)})


def _opaque_type(global_name: str) -> type:
    return type("Opaque_" + global_name.replace(".", "_"), (Opaque,), {"global_name": global_name})


# ---- tensor rebuild functions (our own, never torch's) ----


def _int(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**62:
        raise pickle.UnpicklingError(f"{what} must be a non-negative integer, got {_short(value)}")
    return value


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise pickle.UnpicklingError(
            f"{what} must be a tuple of at most {MAX_DIMS} integers, got {_short(value)}"
        )
    return tuple(_int(v, what) for v in value)


def _tensor_ref(storage: object, dtype: str, offset: object, size: object, stride: object) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"tensor storage must be a storage record, got {_short(storage)}")
    offset, shape, strides = (
        _int(offset, "storage offset"),
        _int_tuple(size, "size"),
        _int_tuple(stride, "stride"),
    )
    if len(shape) != len(strides):
        raise pickle.UnpicklingError(f"size {shape} and stride {strides} differ in length")
    storage_bytes = storage.numel * itemsize(storage.dtype)
    if storage_bytes % itemsize(dtype):
        raise pickle.UnpicklingError(
            f"storage {storage.key!r} of {storage_bytes} bytes does not hold whole {dtype}"
        )
    available = storage_bytes // itemsize(dtype)
    count = math.prod(shape)
    if count == 0:
        if offset > available:
            raise pickle.UnpicklingError(
                f"offset {offset} is beyond storage {storage.key!r} ({available} elements)"
            )
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= available:
            raise pickle.UnpicklingError(
                f"tensor of size {shape}, stride {strides}, offset {offset} reaches element {last} "
                f"of storage {storage.key!r} which has only {available}"
            )
        # Zero strides repeat data for free; cap how large such a view may claim to be.
        if count > 64 * available + 2**20:
            raise pickle.UnpicklingError(f"tensor of size {shape} is implausibly large for its storage")
    return TensorRef(storage, dtype, offset, shape, strides)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> TensorRef:
    dtype = storage.dtype if isinstance(storage, StorageRef) else "float32"
    return _tensor_ref(storage, dtype, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *rest):
    if rest or metadata:  # metadata marks conjugate/negative-bit views, which need arithmetic we don't do
        raise pickle.UnpicklingError("tensors with conjugate/negative bits are not supported")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None, *rest):
    if rest or metadata:
        raise pickle.UnpicklingError("tensors with conjugate/negative bits are not supported")
    if not isinstance(dtype, StorageType):
        raise pickle.UnpicklingError(f"tensor dtype must be a torch dtype, got {_short(dtype)}")
    return _tensor_ref(storage, dtype.dtype, offset, size, stride)


def _rebuild_parameter(
    data: object, requires_grad: object = False, hooks: object = None, state: object = None
):
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError(f"parameter data must be a tensor, got {_short(data)}")
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> TensorRef:
    # torch wraps Tensor subclasses (e.g. Parameter) this way; we only accept our own rebuilders.
    if not (isinstance(func, _Function) and func.func in _REBUILDERS and isinstance(args, tuple)):
        raise pickle.UnpicklingError(f"_rebuild_from_type_v2 got an unexpected function {_short(func)}")
    return func(*args)


def _torch_size(values: object = ()) -> tuple[int, ...]:
    return _int_tuple(values, "torch.Size")


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(<latin-1 text>, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin-1")


_STORAGE_TYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

_ALLOWED: dict[str, object] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": _Function(_rebuild_tensor),
    "torch._utils._rebuild_tensor_v2": _Function(_rebuild_tensor_v2),
    "torch._utils._rebuild_tensor_v3": _Function(_rebuild_tensor_v3),
    "torch._utils._rebuild_parameter": _Function(_rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": _Function(_rebuild_parameter),
    "torch._tensor._rebuild_from_type_v2": _Function(_rebuild_from_type_v2),
    "torch.Size": _Function(_torch_size),
    "torch.nn.modules.container.ParameterDict": ParameterDictStandIn,
    "_codecs.encode": _Function(_codecs_encode),
    "builtins.set": set,
    "__builtin__.set": set,
    "builtins.frozenset": frozenset,
    "__builtin__.frozenset": frozenset,
    "torch.storage.UntypedStorage": StorageType("uint8"),
    "torch.UntypedStorage": StorageType("uint8"),
    **{f"torch.{name}": StorageType(dtype) for name, dtype in _STORAGE_TYPES.items()},
    **{f"torch.{dtype}": StorageType(dtype) for dtype in KNOWN_DTYPES},
}

# Harmless globals seen in real checkpoints; each becomes its own inert placeholder type.
_PLACEHOLDERS = frozenset(
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
        "torch.device",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
    }
)


def _short(value: object, limit: int = 80) -> str:
    """Text for error messages: bounded, and without control characters from the file."""
    if isinstance(value, (bytes, str)):
        value = value[: limit + 1]
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from ``_ALLOWED``/``_PLACEHOLDERS`` and whose storages
    come from ``load_storage(dtype, key, numel) -> StorageRef``."""

    def __init__(
        self, data: bytes, path: object, where: str, load_storage: Callable[[str, str, int], StorageRef]
    ):
        super().__init__(io.BytesIO(data))
        self._path, self._where, self._load_storage = path, where, load_storage
        self._storages: dict[str, StorageRef] = {}
        self._views: dict[str, StorageRef] = {}
        self._placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if full in _PLACEHOLDERS:
            return self._placeholders.setdefault(full, _opaque_type(full))
        raise CheckpointError(
            self._path,
            f"{self._where} refers to the global '{_short(full, 120)}', which is not on sdgraph's allow-list "
            "of tensor-building functions, so the file was not loaded (it may be malicious). "
            "If you trust it, convert it to .safetensors with a trusted tool.",
        )

    def persistent_load(self, pid: object) -> StorageRef:
        # zip format: ('storage', type, key, location, numel); pre-1.6 files add a view description.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent record {_short(pid)}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"malformed storage record {_short(pid)}")
        storage = self._storage(storage_type.dtype, key, _int(numel, "storage size"))
        view = pid[5] if len(pid) == 6 else None
        return storage if view is None else self._view(storage, view)

    def _view(self, root: StorageRef, view: object) -> StorageRef:
        """Pre-1.6 files may describe a storage as (key, offset, size) elements of another one."""
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise pickle.UnpicklingError(f"malformed storage view {_short(view)}")
        key, offset, size = view[0], _int(view[1], "view offset"), _int(view[2], "view size")
        if offset + size > root.numel:
            raise pickle.UnpicklingError(f"storage view {key!r} reaches past storage {root.key!r}")
        step = itemsize(root.dtype)
        known = self._views.get(key)
        if known is None:
            known = self._views[key] = StorageRef(
                key,
                root.dtype,
                size,
                lambda: root.read_bytes()[offset * step : (offset + size) * step],
                root.byteorder,
            )
        elif (known.dtype, known.numel) != (root.dtype, size):
            raise pickle.UnpicklingError(f"storage view {key!r} is declared twice with different sizes")
        return known

    def _storage(self, dtype: str, key: str, numel: int) -> StorageRef:
        known = self._storages.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (dtype, numel):
                raise pickle.UnpicklingError(
                    f"storage {key!r} is declared twice with different types or sizes"
                )
            return known
        storage = self._load_storage(dtype, key, numel)
        self._storages[key] = storage
        return storage


def _prescan(data: bytes) -> None:
    """Walk the opcodes without running them: bounded lengths, small memo indices, no odd opcodes."""
    count = 0
    for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
        count += 1
        if opcode.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"opcode {opcode.name} is not used by PyTorch checkpoints")
        if opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and int(arg) > count:
            raise pickle.UnpicklingError(f"memo index {arg} is out of range")
        if opcode.name == "FRAME" and arg > len(data):
            raise pickle.UnpicklingError("frame is longer than the pickle")


def load_restricted(
    data: bytes, path: object, where: str, load_storage: Callable[[str, str, int], StorageRef]
) -> Any:
    """Unpickle ``data`` (the member ``where`` of checkpoint ``path``) with the allow-list above.

    Every failure, including malformed pickles, becomes ``CheckpointError`` naming the file.
    """
    try:
        _prescan(data)
        return RestrictedUnpickler(data, path, where, load_storage).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a hostile pickle can raise almost anything; report it as a bad file
        raise CheckpointError(
            path, f"{where} is not a valid PyTorch checkpoint pickle: {_short(str(exc), 200)}"
        ) from exc
