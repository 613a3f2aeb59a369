"""The persistent, content-addressed store: one file per cache key under <root>/objects/.

Entry file: MAGIC, an 8-byte header length, a JSON header (socket types, blob lengths, files written,
sha256 of the payload), then the blobs. Writes go to a temp file in the same folder and are renamed
into place, so a reader (in this or another process) sees a whole entry or none; two processes writing
the same key both write a complete file and the last rename wins. Reads verify the checksum.
Recency is the file's mtime (touched on every hit); the least recent entries go when over budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from graph.context import atomic_path

MAGIC = b"SDGRAPH-CACHE-1\n"
DEFAULT_MAX_BYTES = 10 << 30
STALE_TEMP_SECONDS = 3600


def default_cache_dir() -> Path:
    """SDGRAPH_CACHE_DIR, else the platform's user cache folder + /sdgraph."""
    env = os.environ.get("SDGRAPH_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sdgraph"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdgraph"


def default_max_bytes() -> int:
    env = os.environ.get("SDGRAPH_CACHE_MAX_BYTES")
    return int(env) if env else DEFAULT_MAX_BYTES


def human_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, ... up to GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class CorruptEntry(Exception):
    pass


@dataclass
class Entry:
    types: list[str]
    blobs: list[bytes]
    files: list[str] = field(default_factory=list)


class DiskCache:
    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    def _path(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def get(self, key: str) -> Entry | None:
        """The entry, or None when absent. Raises CorruptEntry (after deleting the file) if damaged."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            entry = _decode(data)
        except CorruptEntry:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used
        return entry

    def put(self, key: str, entry: Entry) -> None:
        path = self._path(key)
        with atomic_path(path) as tmp:
            tmp.write_bytes(_encode(entry))
        self.evict(keep=path)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until within budget; returns how many went."""
        entries = []
        total = 0
        now = time.time()
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TEMP_SECONDS:  # left by a killed process
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                continue
            entries.append((st.st_mtime, path, st.st_size))
            total += st.st_size
        removed = 0
        for _, path, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
            total -= size
        return removed

    def _files(self):
        """The entry files, in their two-hex-digit sub-folders."""
        if self.objects.is_dir():
            for sub in self.objects.iterdir():
                if sub.is_dir():
                    yield from (p for p in sub.iterdir() if p.is_file())

    def info(self) -> dict:
        """entries/bytes: cached node results, bounded by max_bytes."""
        counts = {"entries": 0, "bytes": 0}
        for p in self._files():
            if not p.name.endswith(".tmp"):
                counts["entries"] += 1
                counts["bytes"] += p.stat().st_size
        return {"cache_dir": str(self.root), **counts, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        """Remove every entry (only what this store creates)."""
        for name in ("objects", "fingerprints.json"):
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()


def _encode(entry: Entry) -> bytes:
    payload = b"".join(entry.blobs)
    header = json.dumps({
        "types": entry.types,
        "lengths": [len(b) for b in entry.blobs],
        "files": entry.files,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + payload


def _decode(data: bytes) -> Entry:
    try:
        if not data.startswith(MAGIC):
            raise CorruptEntry("bad magic")
        start = len(MAGIC) + 8
        (header_len,) = struct.unpack("<Q", data[len(MAGIC):start])
        header = json.loads(data[start:start + header_len])
        payload = data[start + header_len:]
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise CorruptEntry("checksum mismatch")
        blobs, offset = [], 0
        for length in header["lengths"]:
            blobs.append(payload[offset:offset + length])
            offset += length
        if offset != len(payload):
            raise CorruptEntry("length mismatch")
        return Entry(list(header["types"]), blobs, list(header["files"]))
    except CorruptEntry:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptEntry(str(e)) from e
