"""Distributed sweeps: 2 and 3 local ranks on the CPU (mlx.launch, ring backend on 127.0.0.1).

Each launch costs a few seconds (processes, imports, ring set-up), so every launch checks several
things: each variation produced exactly once, names from the variation id, content byte-identical to a
single-process run, one manifest, the model loaded once per rank; a failing variation is reported by
id; a crashed rank's variations are listed; --only-missing runs only what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from graph.distributed import runner as drunner
from graph.distributed import world as dworld
from nodes.distributed import launch as dlaunch

ROOT = Path(__file__).resolve().parents[1]

# Test nodes, written to a file and loaded through SDGRAPH_EXTRA_NODES by every rank. Each execution
# is logged with the process id (and, for the sink, the variation id) so the test can count them.
NODES = '''
import os
from pathlib import Path
from graph import FLOAT, Int, String, Float, node, socket_type
from graph.distributed import tagged_stem

DMODEL = socket_type("DISTMODEL")  # no serializer: memory cache only, like MODEL


def _log(*words):
    with open(os.environ["DIST_TEST_LOG"], "a") as f:
        f.write(" ".join(str(w) for w in (*words, os.getpid())) + "\\n")


@node(category="test", outputs=(DMODEL,))
def DLoad(name: String() = "m"):
    """Stands in for a checkpoint loader."""
    _log("load")
    return {"scale": 3.0}


@node(category="test", outputs=(FLOAT,))
def DValue(model: DMODEL, text: String(), seed: Int(0, 1000) = 0):
    """A number from the model, the text and the seed."""
    return model["scale"] * len(text) + seed


@node(category="test", output=True)
def DEmit(x: Float(), filename_prefix: String() = "d", ctx=None):
    """Write x to {prefix}[_{variation id}]_{counter:05}_.txt; fails or crashes on request."""
    _log("emit", ctx.run_info["variation"]["id"])
    if os.environ.get("DIST_TEST_FAIL_ON") == repr(x):
        raise RuntimeError(f"failing on purpose at x={x}")
    if os.environ.get("DIST_TEST_CRASH_ON") == repr(x):
        os._exit(3)
    stem = tagged_stem(filename_prefix, ctx.run_info)
    n = 1
    while True:
        try:
            with ctx.output_file(Path(ctx.output_dir) / f"{stem}_{n:05}_.txt", overwrite=False) as tmp:
                tmp.write_text(f"x={x!r}\\n")
            return
        except FileExistsError:
            n += 1
'''

WORKFLOW = """
params: {seed: 0, text: a}
nodes:
  model: {type: DLoad}
  value: {type: DValue, model: {from: model.DISTMODEL}, text: $text, seed: $seed}
  out:   {type: DEmit, x: {from: value.FLOAT}, filename_prefix: toy}
"""
# 5 seeds x 2 texts = 10 variations; x = 3*len(text) + seed: 3..7 and 30..34 (all distinct)
SWEEP = ["--sweep", "seed=0,1,2,3,4", "--sweep", "text=a,bbbbbbbbbb"]


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "distnodes.py").write_text(NODES)
    (tmp_path / "wf.yaml").write_text(textwrap.dedent(WORKFLOW).lstrip())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "DIST_TEST_"))}
    env.update(SDGRAPH_EXTRA_NODES=str(tmp_path / "distnodes.py"), DIST_TEST_LOG=str(tmp_path / "log.txt"),
               PYTHONPATH=str(ROOT), SDGRAPH_CACHE_DIR=str(tmp_path / "cache"))
    return tmp_path, env


def run_group(cmd: list[str], stdin=subprocess.DEVNULL, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on a time-out kill the whole group (launcher and ranks)."""
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out: {' '.join(cmd)}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def sdgraph(tmp: Path, env: dict, *args: str, extra_env: dict | None = None):
    """`sdgraph run ...` (the real CLI) as a subprocess in `tmp`."""
    return run_group([sys.executable, str(ROOT / "cli.py"), "run", *args], cwd=tmp,
                     env=env | (extra_env or {}))


def log(tmp: Path) -> list[list[str]]:
    path = tmp / "log.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def single_process(tmp: Path, env: dict) -> dict[str, bytes]:
    """The plain one-process `sdgraph run` (counter file names): variation id -> file content."""
    proc = sdgraph(tmp, env, "wf.yaml", *SWEEP, "--json", "--output-dir", "out1", "--cache-dir", "cache1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert all(len(v["files"]) == 1 for v in summary["variations"])
    return {v["id"]: (tmp / v["files"][0]).read_bytes() for v in summary["variations"]}


def under_mlx_launch(tmp: Path, env: dict, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`mlx.launch -n R -- sdgraph run ...` started by hand (ring on 127.0.0.1)."""
    cmd = [*dlaunch.launcher_command(), "--hosts", "127.0.0.1", "-n", str(ranks), "--backend", "ring",
           "--starting-port", str(dlaunch.free_port_range(ranks)), "--",
           sys.executable, "-m", "cli", "run", *args]
    stdin, keep_open = os.pipe()  # mlx.launch polls its stdin: give it one that stays empty, not EOF
    try:
        proc = run_group(cmd, stdin=stdin, cwd=tmp, env=env)
    finally:
        os.close(stdin)
        os.close(keep_open)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("ranks,launcher", [(2, "mlx.launch"), (3, "--distributed")])
def test_sweep_over_ranks_matches_single_process(toy, ranks, launcher):
    tmp, env = toy
    expected = single_process(tmp, env)
    (tmp / "log.txt").unlink()

    out = f"out{ranks}"
    args = ["wf.yaml", *SWEEP, "--json", "--output-dir", out, "--cache-dir", f"cache{ranks}",
            "--manifest", "manifest.json"]
    if launcher == "mlx.launch":
        proc = under_mlx_launch(tmp, env, ranks, *args)
    else:
        proc = sdgraph(tmp, env, *args, "--distributed", "-n", str(ranks))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)  # stdout is exactly one JSON document: one manifest, from rank 0
    assert manifest == json.loads((tmp / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["distributed"]["ranks"] == ranks
    assert manifest["distributed"]["backend"] == "ring"
    assert manifest["counts"] == {"variations": 10, "ran": 10, "skipped": 0, "failed": 0}

    variations = manifest["variations"]
    assert [v["id"] for v in variations] == list(expected)  # each variation once, in sweep order
    for v in variations:
        assert v["rank"] == v["index"] % ranks  # round-robin over the stable list
        assert v["files"] == [f"{out}/toy_{v['id']}_00001_.txt"]  # named by variation, not by rank/timing
        assert (tmp / v["files"][0]).read_bytes() == expected[v["id"]]
        assert v["overrides"] == {"seed": v["overrides"]["seed"], "text": v["overrides"]["text"]}
    on_disk = sorted(p.name for p in (tmp / out).glob("*.txt"))
    assert on_disk == sorted(Path(f).name for f in manifest["files"])

    lines = log(tmp)
    emitted = Counter(words[1] for words in lines if words[0] == "emit")
    assert emitted == Counter(list(expected))  # every variation ran exactly once over all ranks
    loads = Counter(words[1] for words in lines if words[0] == "load")
    assert len(loads) == ranks and set(loads.values()) == {1}  # each rank loaded its model once


@pytest.mark.slow
def test_failed_variation_then_only_missing(toy):
    tmp, env = toy
    args = ["wf.yaml", *SWEEP, "--distributed", "-n", "2", "--json"]
    proc = sdgraph(tmp, env, *args, extra_env={"DIST_TEST_FAIL_ON": "31.0"})  # seed=1 text=bbbbbbbbbb
    assert proc.returncode == 1, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["status"] == "failed" and manifest["counts"]["failed"] == 1
    [failed] = manifest["failed"]
    assert failed["overrides"] == {"seed": "1", "text": "bbbbbbbbbb"}
    assert failed["failed_node"] == "out" and "failing on purpose" in failed["error"]
    assert failed["rank"] == 3 % 2  # index 3 in the sweep
    assert failed["id"] in proc.stderr and "--only-missing" in proc.stderr
    ok = {v["id"]: v["files"] for v in manifest["variations"] if v["status"] == "ok"}
    assert len(ok) == 9 and not list((tmp / "output").glob(f"*{failed['id']}*"))

    before = len(log(tmp))
    proc = sdgraph(tmp, env, *args, "--only-missing")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["counts"] == {"variations": 10, "ran": 1, "skipped": 9, "failed": 0}
    assert [w[1] for w in log(tmp)[before:] if w[0] == "emit"] == [failed["id"]]  # only the missing one ran
    assert {v["id"]: v["files"] for v in again["variations"] if v["status"] == "skipped"} == ok
    assert len(again["files"]) == 10 and len(list((tmp / "output").glob("*.txt"))) == 10

    # a changed workflow is not "done": its outputs would differ (one process is enough to see that)
    proc = sdgraph(tmp, env, "wf.yaml", *SWEEP, "--json", "--only-missing", "--set", "model.name=other")
    assert json.loads(proc.stdout)["counts"]["ran"] == 10


@pytest.mark.slow
def test_crashed_rank_lists_its_variations(toy):
    tmp, env = toy
    args = ("wf.yaml", *SWEEP, "--distributed", "-n", "2", "--json")
    crash = {"DIST_TEST_CRASH_ON": "31.0"}  # kills rank 1 at its 2nd variation
    try:
        proc = sdgraph(tmp, env, *args, extra_env=crash)
    except AssertionError as e:
        # Once in three full CI runs on 2 busy cores the surviving rank hung in MLX's ring backend after its
        # peer died (passes alone every time): one retry of a hang; every expectation below stays
        if "timed out" not in str(e):
            raise
        proc = sdgraph(tmp, env, *args, extra_env=crash)
    assert proc.returncode == 1
    manifest = json.loads(proc.stdout)
    assert manifest["status"] == "failed" and "rank 0 did not report" in manifest["error"]
    by_index = {v["index"]: v for v in manifest["variations"]}
    assert by_index[1]["status"] == "ok" and by_index[1]["rank"] == 1  # rank 1's first variation was made
    lost = [v for v in manifest["variations"] if v["status"] == "missing"]
    assert [v["index"] for v in lost if v["rank"] == 1] == [3, 5, 7, 9]
    # rank 0 may have been stopped by the launcher before it finished its own share
    assert all(v["rank"] == 0 and v["index"] % 2 == 0 for v in lost if v["rank"] != 1)
    assert {f["id"] for f in manifest["failed"]} == {v["id"] for v in lost}
    assert not [p for p in (tmp / "output").iterdir() if p.name.endswith(".tmp")]  # no partial files
    assert "rank 1: 4 not produced" in proc.stderr
    assert all(v["id"] in proc.stderr for v in lost)


@pytest.mark.slow
def test_world_of_one_and_only_missing_without_launcher(toy):
    """--only-missing works without a launcher, and `--distributed -n 1` (a world of one) picks up
    from it: same names, done variations skipped."""
    tmp, env = toy
    first = sdgraph(tmp, env, "wf.yaml", "--sweep", "seed=0,1", "--only-missing", "--json")
    assert first.returncode == 0, first.stderr
    m = json.loads(first.stdout)
    assert m["counts"]["ran"] == 2 and m["distributed"]["ranks"] == 1
    assert all(v["files"] == [f"output/toy_{v['id']}_00001_.txt"] for v in m["variations"])
    proc = sdgraph(tmp, env, "wf.yaml", "--sweep", "seed=0,1,2", "--only-missing", "--json",
                   "--distributed", "-n", "1")
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)
    assert second["counts"] == {"variations": 3, "ran": 1, "skipped": 2, "failed": 0}
    [new] = [v for v in second["variations"] if v["status"] == "ok"]
    assert new["rank"] == 0 and new["files"] == [f"output/toy_{new['id']}_00001_.txt"]


# -- the real SD nodes: tiny random checkpoint, txt2img with a seed sweep ---------------------------

SD_SWEEP = ["--set", "width=64", "--set", "height=64", "--set", "steps=2", "--sweep", "seed=1,2,3,4"]


def _sd_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "SDGRAPH_"))}
    return env | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def sd_single(tmp_path_factory):
    """Demo models (shared with the other SD tests) and a plain one-process run: id -> PNG bytes."""
    from sd_nodes_testing import shared_models

    root = shared_models(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("sd-single")
    folders = ["--models-dir", str(root / "models"), "--input-dir", str(root / "input")]
    proc = sdgraph(tmp, _sd_env(), str(ROOT / "workflows" / "txt2img.yaml"), *folders, *SD_SWEEP, "--json",
                   "--output-dir", "out", "--cache-dir", "cache")
    assert proc.returncode == 0, proc.stderr
    variations = json.loads(proc.stdout)["variations"]
    return folders, {v["id"]: (tmp / v["files"][0]).read_bytes() for v in variations}


@pytest.fixture(scope="module")
def sd_distributed(sd_single, tmp_path_factory):
    """`ranks` -> (folder, stderr, manifest) of a --distributed run of the same sweep (each made once)."""
    folders, _ = sd_single
    runs: dict[int, tuple] = {}

    def get(ranks: int):
        if ranks not in runs:
            tmp = tmp_path_factory.mktemp(f"sd-ranks{ranks}")
            proc = sdgraph(tmp, _sd_env(), str(ROOT / "workflows" / "txt2img.yaml"), *folders, *SD_SWEEP,
                           "--distributed", "-n", str(ranks), "--json", "--output-dir", "out",
                           "--cache-dir", "cache")
            assert proc.returncode == 0, proc.stderr
            runs[ranks] = tmp, proc.stderr, json.loads(proc.stdout)
        return runs[ranks]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_sd_seed_sweep_over_ranks_is_byte_identical(sd_single, sd_distributed, ranks):
    _, expected = sd_single
    tmp, stderr, manifest = sd_distributed(ranks)
    assert manifest["status"] == "ok" and manifest["counts"]["ran"] == 4
    assert [v["id"] for v in manifest["variations"]] == list(expected)
    for v in manifest["variations"]:
        assert v["rank"] == v["index"] % ranks
        [png] = v["files"]
        assert (tmp / png).read_bytes() == expected[v["id"]]  # pixels and embedded workflow
    assert len(list((tmp / "out").glob("*.png"))) == 4  # nothing twice
    unet_loads = Counter(line.split("]")[0] for line in stderr.splitlines() if "loaded UNet" in line)
    assert unet_loads == Counter({f"[rank {r}": 1 for r in range(ranks)})  # once per rank


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_sd_file_names_come_from_the_variation(sd_single, sd_distributed, ranks):
    _, expected = sd_single
    _, _, manifest = sd_distributed(ranks)
    assert {v["id"]: v["files"] for v in manifest["variations"]} == {
        vid: [f"out/txt2img_{vid}_00001_.png"] for vid in expected}


# -- in-process units -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_shard_covers_each_item_once(size):
    items = list(range(17))
    parts = [drunner.shard(items, r, size) for r in range(size)]
    assert sorted(x for p in parts for x in p) == items
    assert all(max(len(p) for p in parts) - len(q) <= 1 for q in parts)


def test_tagged_stem():
    assert drunner.tagged_stem("img", {}) == "img"
    assert drunner.tagged_stem("sub/img", {"file_tag": "abc123"}) == "sub/img_abc123"


def test_argv_round_trip():
    from graph.distributed import add_run_arguments

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", default=[])
    run.add_argument("--sweep", action="append", default=[])
    run.add_argument("--output-dir")
    run.add_argument("--quiet", "-q", action="store_true")
    run.add_argument("--json", action="store_true")
    add_run_arguments(run)
    args = parser.parse_args(["run", "--set", "a.b=-1", "--sweep", "s=1,2", "--sweep", "t=@x.txt", "-q",
                              "--output-dir", "o", "--distributed", "-n", "3", "--only-missing",
                              "--", "-wf.yaml"])
    child = dlaunch.argv_from_args(run, args)
    assert "--distributed" not in child and not any(a.startswith("--ranks") for a in child)
    back = parser.parse_args(["run", *child])
    for name in ("workflow", "set", "sweep", "output_dir", "quiet", "only_missing"):
        assert getattr(back, name) == getattr(args, name)
    assert back.distributed is False


def test_local_rank_and_gpu_pinning(tmp_path, monkeypatch):
    ring = [["10.0.0.1:5000"], ["10.0.0.1:5001"], ["10.0.0.2:5002"], ["10.0.0.1:5003"]]
    (tmp_path / "hosts.json").write_text(json.dumps(ring))
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    expected = {0: 0, 1: 1, 2: 0, 3: 2}
    for rank, local in expected.items():
        monkeypatch.setenv("MLX_RANK", str(rank))
        assert dworld.local_rank() == local
    assert dworld.expected_size() == 4
    monkeypatch.setattr(dworld, "nvidia_gpu_count", lambda: 2)
    assert dworld.pin_local_gpu() == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # rank 3: local 2
    monkeypatch.setattr(dworld, "nvidia_gpu_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert dworld.pin_local_gpu() is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_lone_process_world():
    world = dworld.World()
    assert (world.rank, world.size, world.is_root) == (0, 1, True)
    assert world.all_gather_json({"a": 1}) == [{"a": 1}]


def test_a_rank_killed_before_it_reported_still_has_its_share_listed(tmp_path, capsys):
    """The launcher may stop rank 0 before it wrote which variations were its own (seen in CI): the
    split is deterministic, so its variations are still listed under it, not under no rank."""
    from types import SimpleNamespace

    from graph.sweep import Variation
    prepared = [SimpleNamespace(variation=Variation(i, f"v{i}", {"seed": str(i)})) for i in range(6)]
    rank1 = [json.dumps({"event": "assigned", "ids": ["v1", "v3", "v5"], "skipped": {}}),
             json.dumps({"event": "finished", "id": "v1", "status": "ok",
                         "record": {"index": 1, "id": "v1", "overrides": {"seed": "1"}, "rank": 1,
                                    "status": "ok", "files": ["output/v1.txt"]}})]
    (tmp_path / "rank-1.jsonl").write_text("\n".join(rank1) + "\n")
    args = argparse.Namespace(workflow="wf.yaml", quiet=False, json=True, manifest=None, only_missing=False)
    assert dlaunch._report_lost(args, prepared, tmp_path, 2, "ring") == 1
    out = capsys.readouterr()
    manifest = json.loads(out.out)
    lost = {v["index"]: v["rank"] for v in manifest["variations"] if v["status"] == "missing"}
    assert lost == {0: 0, 2: 0, 4: 0, 3: 1, 5: 1}
    assert "rank 0: stopped before it started its variations: 3 not produced" in out.err
    assert "rank 1: 2 not produced" in out.err

    # with --only-missing the share depends on what was done, which a silent run cannot tell: no guess
    args.only_missing = True
    (tmp_path / "rank-1.jsonl").unlink()
    dlaunch._report_lost(args, prepared, tmp_path, 2, "ring")
    manifest = json.loads(capsys.readouterr().out)
    assert {v["rank"] for v in manifest["variations"]} == {None}


def test_ranks_sharing_one_device_are_told_so():
    """2 CPU ranks on a 2-core machine ran 2.3x slower than one process, silently (issue 21)."""
    note = dlaunch.sharing_note(2, device="cpu", cores=2)
    assert note and "2 ranks share this machine's 2 CPU cores" in note and "no speed-up" in note
    assert "share 1 GPU" in dlaunch.sharing_note(2, device="cuda", gpus=1)
    assert "this Mac's GPU" in dlaunch.sharing_note(3, device="metal")
    assert dlaunch.sharing_note(2, device="cuda", gpus=2) is None  # a GPU each: the case it is for
    assert dlaunch.sharing_note(1, device="cpu", cores=2) is None
