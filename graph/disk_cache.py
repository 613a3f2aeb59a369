"""The persistent, content-addressed store: one file per cache key under <root>/objects/.

Entry file: MAGIC, an 8-byte header length, a JSON header (socket types, blob lengths, files written,
sha256 of the payload), then the blobs. Writes go to a temp file in the same folder and are renamed
into place, so a reader (in this or another process) sees a whole entry or none; two processes writing
the same key both write a complete file and the last rename wins. Reads verify the checksum.
Recency is the file's mtime (touched on every hit); the least recent entries go when over budget.

The folder is not trusted: it is created private (0700); an entry's file must be exactly as long as its
header says before its payload is read; and whatever is broken (a file where the folder should be, an entry
that is a folder, no permission, a bad SDGRAPH_CACHE_MAX_BYTES) warns once and costs cache hits, never the
run. Temp files carry their writer's host and pid (graph.context.temp_owner_tag), so the next run removes
those of killed processes at once and leaves live ones alone. `clear()` also removes `kernels/`, the CPU
kernels sd compiles here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from graph.context import atomic_path, is_stale_temp, remove_stale_temps

MAGIC = b"SDGRAPH-CACHE-1\n"
DEFAULT_MAX_BYTES = 10 << 30


def default_cache_dir() -> Path:
    """SDGRAPH_CACHE_DIR, else the platform's user cache folder + /sdgraph."""
    env = os.environ.get("SDGRAPH_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sdgraph"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdgraph"


ENV_MAX_BYTES = "SDGRAPH_CACHE_MAX_BYTES"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_warned: set[str] = set()


def warn_once(message: str, key: str | None = None) -> None:
    """One line on stderr per problem (`key`, default the message) per process: a broken cache costs speed,
    never the run."""
    key = message if key is None else key
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr)


def parse_size(text: str, what: str = ENV_MAX_BYTES) -> int:
    """Bytes from `10737418240`, `1e9`, `10G`, `10GB`, `10GiB`, `512M`, `1.5G`, `64k` (binary units); else
    ValueError. The same spellings as sd.loading.store.parse_size (plus `1e9`): graph may not import sd and
    sd may not import graph (tests/test_layering.py), and ten lines do not justify a third package; a test
    holds the two to the same answers."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is not None:
        number, unit = float(match.group(1)), match.group(2).upper()
        if unit or number == int(number):
            return int(number * _UNITS[unit])
    raise ValueError(f"{what}={text!r} is not a size: give bytes (10737418240, 1e9) or a number with "
                     f"K, M, G or T (10G, 512M, 1.5G)")


def default_max_bytes() -> int:
    """SDGRAPH_CACHE_MAX_BYTES, else 10 GiB; a value that is not a size warns once and counts as unset."""
    env = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        return parse_size(env)
    except ValueError as e:
        warn_once(f"{e}; using the default {human_size(DEFAULT_MAX_BYTES)}")
        return DEFAULT_MAX_BYTES


def make_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) readable by this user only (0700); an existing folder is kept
    as it is. Raises OSError (e.g. NotADirectoryError when it is a file)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    return path


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
    """The store under `root`. Whatever is wrong with the folder (a file where a folder should be, no
    permission, an entry that is a folder) costs cache hits and warns once; it never stops a run."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    def _path(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def _trouble(self, doing: str, e: OSError) -> None:
        warn_once(f"disk cache {self.root}: cannot {doing} ({type(e).__name__}: {e}); "
                  "recomputing instead (`sdgraph cache clear` or --no-cache)", key=f"disk cache {self.root}")

    def get(self, key: str) -> Entry | None:
        """The entry, or None when absent or unreadable. Raises CorruptEntry (after deleting the file) if
        damaged."""
        path = self._path(key)
        try:
            data = _read_entry(path)
        except FileNotFoundError:
            return None
        except CorruptEntry:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        except OSError as e:
            self._trouble("read an entry", e)
            if isinstance(e, IsADirectoryError):
                with contextlib.suppress(OSError):
                    path.rmdir()  # an empty folder in an entry's place: make room for the entry
            return None
        try:
            entry = _decode(data)
        except CorruptEntry:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store `entry`; a folder that cannot be written warns once and stores nothing."""
        path = self._path(key)
        try:
            make_private_dir(self.root)
            with atomic_path(path) as tmp:
                tmp.write_bytes(_encode(entry))
        except OSError as e:
            self._trouble("write an entry", e)
            return
        self.evict(keep=path)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until within budget, and the temp files of killed
        processes; returns how many entries went."""
        entries = []
        total = 0
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                continue
            if path.name.startswith("."):
                if is_stale_temp(path):  # left by a killed process
                    with contextlib.suppress(OSError):
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
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
            total -= size
        return removed

    def clean_temps(self) -> int:
        """Remove the temp files killed processes left here (entries, fingerprints.json)."""
        return (remove_stale_temps(self.root, depth=0, untagged=True)
                + remove_stale_temps(self.objects, depth=1, untagged=True))

    def _files(self):
        """The entry files, in their two-hex-digit sub-folders (unreadable ones are skipped)."""
        try:
            subs = [s for s in self.objects.iterdir() if s.is_dir()] if self.objects.is_dir() else []
        except OSError as e:
            self._trouble("list the entries", e)
            return
        for sub in subs:
            try:
                files = [p for p in sub.iterdir() if p.is_file()]
            except OSError as e:
                self._trouble("list the entries", e)
                continue
            yield from files

    def info(self) -> dict:
        """entries/bytes: cached node results, bounded by max_bytes."""
        counts = {"entries": 0, "bytes": 0}
        for p in self._files():
            if not p.name.startswith("."):
                with contextlib.suppress(OSError):
                    counts["bytes"] += p.stat().st_size
                    counts["entries"] += 1
        return {"cache_dir": str(self.root), **counts, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        """Remove every entry and the compiled CPU kernels (only what sdgraph creates here)."""
        for name in ("objects", "fingerprints.json", "kernels"):
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
        self.clean_temps()


def _read_entry(path: Path) -> bytes:
    """The entry's bytes, after checking that the file is as long as its header says (a forged header
    cannot make a reader allocate more than the file holds)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
            raise CorruptEntry("bad magic")
        (header_len,) = struct.unpack("<Q", head[len(MAGIC):])
        if header_len > min(size, 1 << 20):
            raise CorruptEntry(f"header of {header_len} bytes in a {size}-byte file")
        header_bytes = f.read(header_len)
        try:
            lengths = json.loads(header_bytes)["lengths"]
            ok = isinstance(lengths, list) and all(isinstance(n, int) and n >= 0 for n in lengths)
            payload = sum(lengths) if ok else -1
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"bad header ({e})") from e
        if payload != size - len(head) - header_len:
            raise CorruptEntry(f"header says {payload} payload bytes, the file holds "
                               f"{size - len(head) - header_len}")
        return head + header_bytes + f.read()


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
