"""The in-process cache: least recently used entries go first once the byte budget is exceeded."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


def default_memory_budget() -> int:
    """Half the machine's memory (models are big, and on Apple silicon memory is shared with the GPU)."""
    env = os.environ.get("SDGRAPH_MEMORY_CACHE_BYTES")
    if env:
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def value_size(value: Any, hook: Callable[[Any], int] | None = None) -> int:
    """Bytes held by a value: the socket type's hook, else `.nbytes`, else the sum over its parts."""
    if hook is not None:
        return int(hook(value))
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(value_size(v) for v in value)
    if isinstance(value, dict):
        return sum(value_size(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(value_size(getattr(value, f.name)) for f in dataclasses.fields(value))
    return sys.getsizeof(value)


class MemoryCache:
    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = default_memory_budget() if max_bytes is None else max_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.total_bytes = 0

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        if key in self._entries:
            self.total_bytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:
            return  # bigger than the whole budget: keeping it would evict everything else
        self._entries[key] = (value, nbytes)
        self.total_bytes += nbytes
        while self.total_bytes > self.max_bytes:
            _, (_, size) = self._entries.popitem(last=False)
            self.total_bytes -= size

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.total_bytes -= entry[1]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
