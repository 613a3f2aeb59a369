"""The model store: built values (weights, LoRA-patched copies, accelerated wrappers, parsed LoRA files) kept
for reuse under one byte budget, least recently used first out.

    store = ModelStore()                                  # budget: default_budget()
    unet = store.get(("unet", identity), lambda: load_component(path, "unet"))
    fast = store.get(("fast", "unet", identity), lambda: FastUNet(unet), parent=("unet", identity))

The store knows nothing of what a key means (the caller's recipe: nodes/models.py); it knows what a value
costs. An entry's size is the bytes of the arrays it holds (MLX and numpy, found by walking its modules,
lists, dicts and attributes), and the total is over the *union* of every entry's arrays: a LoRA-patched
module shares its unpatched arrays with its base, an accelerated wrapper holds its module, and shared arrays
are counted once. Values are re-measured whenever something is added (a wrapper may build fused weights on
first use). Arrays that were never evaluated (a shapes-only skeleton) can be stored with `weigh=False`.

An entry built with `parent=` depends on that entry: it is evicted with it (a wrapper must not outlive, and
silently keep alive, the model it wraps), may be evicted alone, and using it counts as using its parent.
A value bigger than the whole budget is returned but not kept.

The budget: SDGRAPH_MODEL_CACHE_BYTES (bytes, or a size such as 8G, 512M, 1.5G), else half of the memory the
models live in (physical RAM; on an MLX GPU the smaller of RAM and the device's memory or recommended
working set, as `mx.device_info()` reports them).
"""

from __future__ import annotations

import os
import re
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

ENV_BUDGET = "SDGRAPH_MODEL_CACHE_BYTES"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = ENV_BUDGET) -> int:
    """Bytes from `8589934592`, `8G`, `8GB`, `8GiB`, `512M`, `1.5G`, `64k` (binary units); else ValueError."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None or (match.group(2) == "" and "." in match.group(1)):
        raise ValueError(f"{what}={text!r} is not a size: give bytes (8589934592) or a number with "
                         f"K, M, G or T (8G, 512M, 1.5G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _device_memory() -> int | None:
    """The MLX GPU's memory for models (recommended working set on Metal, total memory elsewhere)."""
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:  # noqa: BLE001 - no device information is not an error
        return None
    for name in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if isinstance(info.get(name), int) and info[name] > 0:
            return info[name]
    return None


def default_budget() -> int:
    """SDGRAPH_MODEL_CACHE_BYTES if set, else half of the memory models live in (8 GiB if unknown)."""
    raw = os.environ.get(ENV_BUDGET)
    if raw is not None and raw.strip():
        return parse_size(raw)
    sizes = [s for s in (_physical_memory(), _device_memory()) if s]
    return min(sizes) // 2 if sizes else 8 << 30


_LEAVES = (str, bytes, int, float, complex, bool, type(None), type, types.FunctionType, types.MethodType,
           types.BuiltinFunctionType, types.ModuleType)


def arrays_in(value: Any) -> dict[int, int]:
    """id -> nbytes of every MLX or numpy array `value` holds, through modules, containers and attributes."""
    import mlx.core as mx
    import numpy as np

    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [value]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, (mx.array, np.ndarray)):
            found[id(obj)] = int(obj.nbytes)
            continue
        if isinstance(obj, dict):  # also nn.Module, a dict of its parameters and children
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                stack.append(getattr(obj, slot))
    return found


@dataclass
class _Entry:
    value: Any
    parent: Hashable | None
    weigh: bool
    arrays: dict[int, int] = field(default_factory=dict)


class ModelStore:
    """Built values by key, bounded by the bytes of the arrays they hold (shared arrays counted once)."""

    def __init__(self, budget: int | None = None):
        self._budget = None if budget is None else int(budget)  # None: default_budget(), read on first use
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._keys_by_value: dict[int, Hashable] = {}
        self._lock = threading.RLock()  # held while building: one build at a time, never the same one twice

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = default_budget()
        return self._budget

    @budget.setter
    def budget(self, value: int | None) -> None:
        with self._lock:
            self._budget = None if value is None else int(value)
            self._fit()

    def get(self, key: Hashable, build: Callable[[], Any] | None = None, *, parent: Hashable | None = None,
            weigh: bool = True) -> Any:
        """The value stored under `key` (now the most recently used); on a miss `build()`'s result, kept
        (see `put`), or None without `build`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._touch(key)
                return entry.value
            if build is None:
                return None
            value = build()
            self.put(key, value, parent=parent, weigh=weigh)
            return value

    def put(self, key: Hashable, value: Any, *, parent: Hashable | None = None, weigh: bool = True) -> None:
        """Keep `value` under `key`, then evict least recently used entries until the total fits the budget.
        `parent` must be stored (else the value is not kept: it would outlive what it depends on)."""
        with self._lock:
            self.discard(key)
            if parent is not None and parent not in self._entries:
                return
            entry = _Entry(value, parent, weigh, arrays_in(value) if weigh else {})
            if sum(entry.arrays.values()) > self.budget:
                return  # keeping it would evict everything else, and then it too
            self._entries[key] = entry
            self._keys_by_value[id(value)] = key
            for e in self._entries.values():  # re-measure: values may have grown since they were added
                if e is not entry and e.weigh:
                    e.arrays = arrays_in(e.value)
            if parent is not None:
                self._touch(key)
            self._fit()

    def _fit(self) -> None:
        while self._entries and self.total_bytes > self.budget:
            self.discard(next(iter(self._entries)))

    def discard(self, key: Hashable) -> None:
        """Drop `key` and every entry that depends on it."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            if self._keys_by_value.get(id(entry.value)) == key:
                del self._keys_by_value[id(entry.value)]
            for child in [k for k, e in self._entries.items() if e.parent == key]:
                self.discard(child)

    def _touch(self, key: Hashable) -> None:
        # a dependent first, then what it depends on: a parent is never older than its dependents
        while key is not None and key in self._entries:
            self._entries.move_to_end(key)
            key = self._entries[key].parent

    def key_of(self, value: Any) -> Hashable | None:
        """The key `value` (the very object) is stored under, or None."""
        with self._lock:
            key = self._keys_by_value.get(id(value))
            entry = self._entries.get(key) if key is not None else None
            return key if entry is not None and entry.value is value else None

    @property
    def total_bytes(self) -> int:
        """Bytes of the arrays held by all entries, each array counted once."""
        with self._lock:
            union: dict[int, int] = {}
            for entry in self._entries.values():
                union.update(entry.arrays)
            return sum(union.values())

    def nbytes(self, key: Hashable) -> int:
        """Bytes of the arrays one entry holds (shared ones included)."""
        with self._lock:
            entry = self._entries.get(key)
            return sum(entry.arrays.values()) if entry is not None else 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._keys_by_value.clear()

    def keys(self) -> Iterator[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return iter(list(self._entries))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
