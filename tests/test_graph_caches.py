"""The memory LRU, the disk store and the fingerprint index on their own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from graph import fingerprint
from graph.disk_cache import CorruptEntry, DiskCache, Entry, default_cache_dir
from graph.fingerprint import FingerprintIndex
from graph.memory_cache import MemoryCache, value_size

ROOT = Path(__file__).resolve().parents[1]


def test_memory_cache_evicts_least_recently_used_by_bytes():
    cache = MemoryCache(max_bytes=100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 40)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.total_bytes == 80
    cache.put("huge", "H", 101)  # bigger than the budget: not kept, evicts nothing
    assert "huge" not in cache and len(cache) == 2


def test_value_size_uses_nbytes_and_sums_containers():
    arr = np.zeros(1000, dtype=np.float32)
    assert value_size(arr) == 4000
    assert value_size((arr, {"x": arr})) == 8000
    assert value_size(arr, hook=lambda v: 7) == 7


def test_disk_round_trip_and_missing(tmp_path):
    store = DiskCache(tmp_path)
    assert store.get("ab" * 32) is None
    store.put("ab" * 32, Entry(["LATENT", "INT"], [b"xyz", b"12"], ["/tmp/f.png"]))
    entry = store.get("ab" * 32)
    assert (entry.types, entry.blobs, entry.files) == (["LATENT", "INT"], [b"xyz", b"12"], ["/tmp/f.png"])
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temp files left behind


def test_disk_corruption_is_detected_and_the_file_removed(tmp_path):
    store = DiskCache(tmp_path)
    key = "cd" * 32
    store.put(key, Entry(["X"], [b"0123456789"]))
    path = next(p for p in tmp_path.rglob("*") if p.is_file())
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptEntry, match="checksum"):
        store.get(key)
    assert not path.exists() and store.get(key) is None


def test_disk_budget_evicts_least_recently_used(tmp_path):
    store = DiskCache(tmp_path, max_bytes=3 * 1200)
    keys = [f"{i:02d}" * 32 for i in range(5)]
    for i, key in enumerate(keys[:3]):
        store.put(key, Entry(["X"], [bytes(1000)]))
        past = time.time() - 100 + i
        os.utime(store._path(key), (past, past))
    store.get(keys[0])  # refreshes its mtime: now the most recently used
    store.put(keys[3], Entry(["X"], [bytes(1000)]))
    assert store.get(keys[1]) is None  # the least recently used went
    assert store.get(keys[0]) is not None and store.get(keys[3]) is not None
    info = store.info()
    assert info["entries"] == 3 and info["bytes"] <= store.max_bytes
    store.clear()
    assert store.info()["entries"] == 0


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SDGRAPH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform != "darwin":
        assert default_cache_dir() == tmp_path / "xdg" / "sdgraph"


WRITER = textwrap.dedent("""
    import sys
    from graph.disk_cache import DiskCache, Entry
    store = DiskCache(sys.argv[1])
    size = int(sys.argv[2])
    for i in range(150):
        store.put("ee" * 32, Entry(["X"], [bytes([size % 251]) * size]))
""")


@pytest.mark.slow
def test_two_processes_writing_the_same_key_never_expose_a_partial_entry(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(size)], env=env)
               for size in (200_000, 300_000)]
    store = DiskCache(tmp_path)
    reads = 0
    while any(w.poll() is None for w in writers):
        entry = store.get("ee" * 32)  # CorruptEntry here would fail the test
        if entry is not None:
            reads += 1
            assert len(entry.blobs[0]) in (200_000, 300_000)
    assert all(w.wait() == 0 for w in writers)
    assert store.get("ee" * 32) is not None and reads > 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_fingerprints_hash_each_file_once_and_change_with_the_file(tmp_path, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 100)
    hashed = []
    real = fingerprint.hash_file
    monkeypatch.setattr(fingerprint, "hash_file", lambda p: hashed.append(p) or real(p))
    index = FingerprintIndex(tmp_path / "fp.json")
    first = index.fingerprint(f)
    assert index.fingerprint(f) == first
    assert FingerprintIndex(tmp_path / "fp.json").fingerprint(f) == first  # remembered on disk
    assert len(hashed) == 1
    f.write_bytes(b"b" * 100)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert index.fingerprint(f) != first and len(hashed) == 2
