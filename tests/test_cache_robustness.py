"""A broken or hostile cache folder never stops a run (issue 21, item 5: the cache bullets).

Each case damages the cache folder of a real run (tiny random models, the real CLI in this process) and
checks that the next run succeeds, writes its image and warns once; and that the folder is not trusted
blindly: forged entry sizes, planted CPU kernels, `cache clear`, its permissions, killed processes' temps.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys

import pytest

from graph import context as graph_context
from graph import disk_cache
from graph.context import ExecutionContext, Folders
from graph.disk_cache import MAGIC, DiskCache
from tests.sd_nodes_testing import SMALL, WORKFLOWS, make_world, run

WF = WORKFLOWS / "txt2img.yaml"


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    disk_cache._warned.clear() if hasattr(disk_cache, "_warned") else None
    return make_world(tmp_path_factory, tmp_path)


def entries(world) -> list[pathlib.Path]:
    return sorted(p for p in (world.cache / "objects").rglob("*") if p.is_file())


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def first_run(world) -> None:
    r = run(world, WF, *SMALL)
    assert r.rc == 0, r.err
    assert entries(world)


def rerun_ok(world, *extra, n_pngs: int = 2) -> str:
    r = run(world, WF, *SMALL, *extra)
    assert r.rc == 0, r.err
    assert "Traceback" not in r.err
    assert len(world.pngs()) == n_pngs, r.err
    return r.err


# ------------------------------------------------------------------------------------- broken entries
@pytest.mark.slow
def test_an_entry_that_is_a_folder_is_recomputed(world):
    first_run(world)
    for p in entries(world):
        p.unlink()
        p.mkdir()
    err = rerun_ok(world, "--set", "seed=5")
    assert len(warnings_in(err)) == 1, err  # warned once, not once per node


def _deny(monkeypatch, under: pathlib.Path, listing: bool = False) -> None:
    """As if `under` were chmod 000 for this user (the tests may run as root, where chmod does not bite)."""
    under = under.resolve()

    def denied(p) -> bool:
        p = pathlib.Path(p).resolve()
        return p == under or under in p.parents

    real_read, real_open, real_iterdir = pathlib.Path.read_bytes, open, pathlib.Path.iterdir

    def read_bytes(self):
        if denied(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    def opener(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and denied(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def iterdir(self):
        if listing and denied(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    monkeypatch.setattr(disk_cache, "open", opener, raising=False)


@pytest.mark.slow
def test_an_unreadable_entry_is_recomputed(world, monkeypatch):
    first_run(world)
    _deny(monkeypatch, world.cache / "objects")  # every entry unreadable, the folder still listed
    err = rerun_ok(world, "--set", "seed=5")
    assert len(warnings_in(err)) == 1, err


@pytest.mark.slow
def test_an_unreadable_objects_folder_is_not_fatal(world, monkeypatch):
    first_run(world)
    _deny(monkeypatch, world.cache / "objects", listing=True)
    err = rerun_ok(world, "--set", "seed=5")
    assert len(warnings_in(err)) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("text", ["[1, 2]", "null", '[["a", "b", "c"]]', '{"a": 1}', "{not json"])
def test_a_malformed_fingerprint_index_is_rebuilt(world, text):
    first_run(world)
    (world.cache / "fingerprints.json").write_text(text)
    err = rerun_ok(world, "--set", "seed=5")
    assert len(warnings_in(err)) == 1, err


@pytest.mark.slow
def test_a_cache_folder_that_is_a_file_means_no_disk_cache(world):
    world.cache.parent.mkdir(parents=True, exist_ok=True)
    world.cache.write_text("not a folder")
    err = rerun_ok(world, n_pngs=1)
    assert len(warnings_in(err)) == 1 and "running without it" in err, err
    assert world.cache.read_text() == "not a folder"


@pytest.mark.slow
def test_a_bad_size_budget_warns_and_uses_the_default(world, monkeypatch):
    monkeypatch.setenv("SDGRAPH_CACHE_MAX_BYTES", "abc")
    err = rerun_ok(world, n_pngs=1)
    assert "SDGRAPH_CACHE_MAX_BYTES='abc' is not a size" in err


@pytest.mark.parametrize("text, expected", [
    ("1e9", 10**9), ("10G", 10 << 30), ("10GB", 10 << 30), ("10GiB", 10 << 30), ("512m", 512 << 20),
    ("1.5G", 3 << 29), ("123", 123), (" 64k ", 64 << 10)])
def test_budget_spellings(monkeypatch, text, expected):
    monkeypatch.setenv("SDGRAPH_CACHE_MAX_BYTES", text)
    assert disk_cache.default_max_bytes() == expected


@pytest.mark.parametrize("text", ["8589934592", "8G", "8GB", "8GiB", "512M", "1.5G", "64k", "abc", "1.5",
                                  "-1G", "", "G"])
def test_graph_and_sd_read_sizes_alike(text):
    """graph keeps its own parser (it may not import sd); on every spelling sd accepts, they agree."""
    from graph.disk_cache import parse_size
    from sd.loading.store import parse_size as sd_parse

    try:
        expected = sd_parse(text)
    except ValueError:
        expected = None
    try:
        got = parse_size(text)
    except ValueError:
        got = None
    assert got == expected


# ----------------------------------------------------------------------------- not trusted blindly
def test_an_entry_whose_header_claims_more_than_the_file_is_refused_before_reading(tmp_path, monkeypatch):
    store = DiskCache(tmp_path)
    key = "ab" + "0" * 62
    path = tmp_path / "objects" / "ab" / key
    path.parent.mkdir(parents=True)
    import json
    import struct

    header = json.dumps({"types": ["LATENT"], "lengths": [16 << 30], "files": [], "sha256": "0" * 64})
    header = header.encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * 1024)
    real_read = pathlib.Path.read_bytes

    def no_whole_read(self):  # an honest reader checks the header first and never slurps the payload
        assert self != path, "read the whole entry before checking its header"
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", no_whole_read)
    with pytest.raises(disk_cache.CorruptEntry, match="payload bytes"):
        store.get(key)
    assert not path.exists()


@pytest.mark.slow
def test_the_cache_folder_is_created_private(world):
    rerun_ok(world, n_pngs=1)
    assert stat.S_IMODE(world.cache.stat().st_mode) == 0o700


def test_cache_clear_removes_the_kernels(tmp_path):
    kernels = tmp_path / "cache" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "cpu_kernels-0123.so").write_bytes(b"not a library")
    DiskCache(tmp_path / "cache").clear()
    assert not kernels.exists()


@pytest.mark.slow
def test_a_planted_or_swapped_kernel_library_is_never_loaded(tmp_path, monkeypatch):
    from sd import runtime
    from sd.accel import cpu_kernels

    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(runtime, "_kernel_dir", tmp_path / "cache" / "kernels")
    built = cpu_kernels.build()
    good = built.read_bytes()
    for planted in (b"\x7fELF planted", good[:-1] + bytes([good[-1] ^ 1])):
        built.write_bytes(planted)
        again = cpu_kernels.build()
        assert again.read_bytes() != planted  # rebuilt, not reused
    built.unlink()
    built.write_bytes(b"\x7fELF planted without a record")
    record = built.with_name(built.name + ".sha256")
    record.unlink(missing_ok=True)
    assert cpu_kernels.build().read_bytes() != b"\x7fELF planted without a record"
    assert stat.S_IMODE(built.parent.stat().st_mode) == 0o700


# ----------------------------------------------------------------------------- what a kill leaves
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


@pytest.mark.slow
def test_temp_files_of_killed_runs_are_removed_on_the_next_run(world):
    first_run(world)
    host = graph_context.temp_owner_tag().rsplit("-", 1)[0] if hasattr(graph_context, "temp_owner_tag") \
        else socket.gethostname()
    dead = _dead_pid()
    left = [world.output / f".txt2img_00009_.png.sdg-{host}-{dead}.abcd1234.tmp",
            world.cache / "objects" / entries(world)[0].parent.name / f".k.sdg-{host}-{dead}.x.tmp",
            world.cache / f".fingerprints.json.sdg-{host}-{dead}.y.tmp"]
    live = world.output / f".other.png.sdg-{host}-{os.getpid()}.zz.tmp"  # a live process's work
    users = world.output / ".notes.tmp"  # not ours: an output folder is the user's
    for p in [*left, live, users]:
        p.write_bytes(b"partial")
    os.utime(users, (1, 1))
    rerun_ok(world, "--set", "seed=5")
    assert [p for p in left if p.exists()] == []
    assert live.exists() and users.exists()


def test_an_interrupt_during_a_save_never_leaves_an_unrecorded_file(tmp_path, monkeypatch):
    """SIGINT right as the PNG is renamed into place: the file is recorded (and so removed by the run's
    clean-up) -- the message 'no partial output files were left' stays true."""
    real_replace = os.replace
    target = tmp_path / "out.png"

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        if pathlib.Path(dst) == target:
            os.kill(os.getpid(), signal.SIGINT)

    ctx = ExecutionContext("save", "SaveImage", Folders(output_dir=tmp_path), {}, tmp_path / "cache")
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with ctx.output_file(target) as tmp:
            tmp.write_bytes(b"png")
    assert target.exists() and target in [pathlib.Path(p) for p in ctx.written_files]


def _npz_member(name: str, npy: bytes, compress: int) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        z.writestr(name, npy)
    return buf.getvalue()


def test_a_cached_value_that_would_decode_to_more_than_it_holds_is_refused():
    """The forged 8 MB entry that took 16.4 GB: deflated members, or a .npy header claiming a larger
    shape than its bytes; refused before allocating (the executor then recomputes the node)."""
    import io

    import numpy as np

    from nodes.values import latent_from_bytes

    def npy(a) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    meta = np.frombuffer(b"{}", dtype=np.uint8)
    deflated = io.BytesIO()
    np.savez_compressed(deflated, samples=np.zeros((1, 8, 8, 4), np.float32), __meta__=meta)
    with pytest.raises(ValueError, match="compressed"):
        latent_from_bytes(deflated.getvalue())
    header = npy(np.zeros(4, np.float32))
    claim = header.replace(b"(4,)", b"(268435456,)")  # 1 GiB claimed, 16 bytes held
    import zipfile

    forged = _npz_member("samples.npy", claim, zipfile.ZIP_STORED)
    with pytest.raises(ValueError, match="claims"):
        latent_from_bytes(forged)
