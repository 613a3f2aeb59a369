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
            with contextlib.suppress(OSError, ValueError):
                self._entries = dict(json.loads(path.read_text()))

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
        with contextlib.suppress(OSError, ValueError):
            if self.path.exists():
                self._entries = dict(json.loads(self.path.read_text())) | self._entries
        with contextlib.suppress(OSError), atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self._entries, indent=0, sort_keys=True))


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
