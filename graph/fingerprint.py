"""File fingerprints for cache keys: size + mtime + a content hash. Hashing a 2 GB checkpoint takes
seconds, so the hash is remembered in a small JSON index keyed by (path, size, mtime_ns)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

from graph.context import atomic_path


class FingerprintIndex:
    """Remembers content hashes; `path=None` keeps them in memory only."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        if path is not None and path.exists():
            self._entries = _read_index(path, warn=True)

    def fingerprint(self, file: Path) -> str:
        """A short string that changes when the file's size, mtime or content changes."""
        st = os.stat(file)
        key = f"{Path(file).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        with self._lock:
            digest = self._entries.get(key)
        if digest is None:
            digest = hash_file(file)
            with self._lock:
                self._entries[key] = digest
                self._save()
        return f"{st.st_size}:{st.st_mtime_ns}:{digest}"

    def _save(self) -> None:
        if self.path is None:
            return
        # Another process may have added entries; merge before writing so neither loses its work.
        if self.path.exists():
            self._entries = _read_index(self.path) | self._entries
        with contextlib.suppress(OSError), atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self._entries, indent=0, sort_keys=True))


def _read_index(path: Path, warn: bool = False) -> dict[str, str]:
    """The index's {key: digest}; anything else (unreadable, not JSON, a list, null) is an empty index
    (the hashes are recomputed and the file rewritten), with one warning."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            return data
        problem = f"holds {type(data).__name__}, not a table of hashes"
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if warn:
        from graph.disk_cache import warn_once

        warn_once(f"file-hash index {path} is unusable ({problem}); rehashing the files it named")
    return {}


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
