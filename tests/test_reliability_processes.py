"""Real `sdgraph run` processes at once, killed, interrupted (issue 21, item 4): tiny random models
(tests/sd_nodes_testing.py), every process bounded by a timeout and killed (its process group) on the way out.

- 2 and 4 runs at once on the same workflow, output folder and cache folder: every run succeeds, each writes
  its own image, no two share a file number, and the cache reads back afterwards;
- kill -9 mid-sampling and mid-cache-write, then a re-run: no partial PNG, no temp left, the cache works;
- SIGINT / SIGTERM / SIGHUP mid-sampling: exit 130 / 143 / 129, the one-line message, the --json summary,
  no partial files, the cache consistent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graph.disk_cache import DiskCache
from tests.sd_nodes_testing import REPO, SMALL, WORKFLOWS, make_world

pytestmark = pytest.mark.slow

WF = WORKFLOWS / "txt2img.yaml"
TIMEOUT = 240


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@contextlib.contextmanager
def sdgraph(world, tmp_path: Path, *extra: str, name: str = "run"):
    """A `sdgraph run` process (its own process group; stdout/stderr to files), killed on the way out."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = dict(os.environ, PYTHONPATH=str(REPO), SDGRAPH_CACHE_MAX_BYTES=str(1 << 30))
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "run", str(WF), *world.folder_args(),
                                 *SMALL, *extra], stdout=fo, stderr=fe, cwd=tmp_path, env=env,
                                start_new_session=True)
    proc.out_path, proc.err_path = out, err
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def finish(proc) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, proc.out_path.read_text(), proc.err_path.read_text()


def wait_for_sampling(proc, step: int = 3) -> None:
    """Until the sampler's progress bar shows `step` steps done (the signal then lands mid-sampling)."""
    deadline = time.monotonic() + TIMEOUT
    pattern = re.compile(r"sampler:.*?\| *(\d+)/(\d+)")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.err_path.read_text()
        done = [int(m.group(1)) for m in pattern.finditer(proc.err_path.read_text())]
        if done and max(done) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"sampling never reached step {step}: {proc.err_path.read_text()[-2000:]}")


def leftovers(folder: Path) -> list[Path]:
    """Hidden temp files and anything that is not a whole PNG."""
    bad = []
    for p in folder.rglob("*") if folder.exists() else []:
        if p.is_file() and (p.name.startswith(".") or p.name.endswith(".tmp")):
            bad.append(p)
        elif p.suffix == ".png" and not p.read_bytes().endswith(b"IEND\xaeB`\x82"):
            bad.append(p)
    return bad


def cache_readable(world) -> int:
    store = DiskCache(world.cache)
    n = 0
    for path in store._files():
        assert not path.name.startswith("."), f"temp left in the cache: {path}"
        assert store.get(path.name) is not None
        n += 1
    return n


def long_sampling() -> list[str]:
    return ["--set", "steps=400"]


# ------------------------------------------------------------------------------------------ at once
@pytest.mark.parametrize("n", [2, 4])
def test_runs_at_once_share_output_and_cache_folders(world, tmp_path, n):
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(sdgraph(world, tmp_path, "--json", "--set", f"seed={i % 2}",
                                             name=f"r{i}")) for i in range(n)]
        results = [finish(p) for p in procs]
    files = []
    for rc, out, err in results:
        assert rc == 0, err
        files += json.loads(out)["files"]
    pngs = world.pngs()
    assert len(files) == n and len(set(files)) == n, files  # nobody's output lost or overwritten
    assert len(pngs) == n
    numbers = [re.search(r"_(\d+)_\.png$", p.name).group(1) for p in pngs]
    assert len(set(numbers)) == n, numbers
    assert leftovers(world.output) == []
    assert cache_readable(world) > 0
    with sdgraph(world, tmp_path, "--json", "--set", "seed=0", name="again") as proc:
        rc, out, err = finish(proc)
    assert rc == 0, err
    statuses = {v["id"]: v["status"] for v in json.loads(out)["variations"][0]["nodes"]}
    assert statuses["sampler"] in ("disk cache", "not needed") and "warning" not in err, (statuses, err)


# ------------------------------------------------------------------------------------------ kill -9
def test_kill_9_mid_sampling_then_a_rerun(world, tmp_path):
    with sdgraph(world, tmp_path, *long_sampling(), name="killed") as proc:
        wait_for_sampling(proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert world.pngs() == []
    with sdgraph(world, tmp_path, "--json", name="rerun") as proc:
        rc, out, err = finish(proc)
    assert rc == 0, err
    assert len(world.pngs()) == 1 and leftovers(world.output) == []
    assert cache_readable(world) > 0


_KILLED_WRITER = """
import os, signal, sys
from graph.context import atomic_path
from graph.disk_cache import DiskCache, Entry
store = DiskCache(sys.argv[1])
path = store._path(sys.argv[2])
with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"SDGRAPH-CACHE-1\\n" + b"half an entry")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_mid_cache_write_then_a_rerun(world, tmp_path):
    with sdgraph(world, tmp_path, "--json", name="first") as proc:
        rc, out, err = finish(proc)
    assert rc == 0, err
    keys = [p.name for p in DiskCache(world.cache)._files()]
    # a process killed while writing an entry, through the store's own write path (the same key as a real
    # entry, and a new one)
    for key in (keys[0], "ff" + "1" * 62):
        proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(world.cache), key], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
        assert proc.returncode == -signal.SIGKILL
    temps = [p for p in world.cache.rglob(".*") if p.is_file()]
    assert len(temps) == 2
    with sdgraph(world, tmp_path, "--json", "--set", "seed=9", name="rerun") as proc:
        rc, out, err = finish(proc)
    assert rc == 0, err
    assert [p for p in world.cache.rglob(".*") if p.is_file()] == []
    assert cache_readable(world) > 0
    assert len(world.pngs()) == 2 and leftovers(world.output) == []


_KILLED_SAVER = """
import os, signal, sys
from pathlib import Path
from graph.context import ExecutionContext, Folders
out = Path(sys.argv[1])
ctx = ExecutionContext("save", "SaveImage", Folders(output_dir=out), {}, out / "unused")
with ctx.output_file(out / "txt2img_00007_.png", overwrite=False) as tmp:
    tmp.write_bytes(b"\\x89PNG half an image")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_mid_save_then_a_rerun(world, tmp_path):
    """A run killed while its PNG is being written leaves only a hidden temp; the next run removes it."""
    world.output.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(world.output)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert world.pngs() == [] and len(leftovers(world.output)) == 1
    with sdgraph(world, tmp_path, "--json", name="rerun") as proc:
        rc, out, err = finish(proc)
    assert rc == 0, err
    assert len(world.pngs()) == 1 and leftovers(world.output) == []


# ------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig, rc_expected, word", [
    (signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
    (signal.SIGHUP, 129, "hung up")])
def test_a_signal_mid_sampling(world, tmp_path, sig, rc_expected, word):
    with sdgraph(world, tmp_path, "--json", *long_sampling(), name="signalled") as proc:
        wait_for_sampling(proc)
        os.kill(proc.pid, sig)
        rc, out, err = finish(proc)
    assert rc == rc_expected, err
    lines = [ln for ln in err.splitlines() if "partial output" in ln]
    assert lines and lines[-1].startswith(word), err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["status"] == "interrupted" and summary["signal"] == sig.name
    assert world.pngs() == [] and leftovers(world.output) == []
    cache_readable(world)
    with sdgraph(world, tmp_path, "--json", name="after") as proc:  # the cache is consistent: a run works
        rc, out, err = finish(proc)
    assert rc == 0, err
    assert len(world.pngs()) == 1


def test_an_interrupted_sweep_says_exactly_what_it_kept(world, tmp_path):
    """Ctrl-C in the second variation: the first one's PNG stays and the message says so; the second
    leaves nothing."""
    with sdgraph(world, tmp_path, "--json", "--sweep", "steps=2,400", name="sweep") as proc:
        wait_for_sampling(proc, step=10)
        os.kill(proc.pid, signal.SIGINT)
        rc, out, err = finish(proc)
    assert rc == 130, err
    assert "interrupted; no partial output files were left; kept the 1 complete output file of finished " \
           "variations" in err, err
    summary = json.loads(out)
    assert len(summary["files"]) == 1 and [p.name for p in world.pngs()] == [Path(summary["files"][0]).name]
    assert leftovers(world.output) == []
