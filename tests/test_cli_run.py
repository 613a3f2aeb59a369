"""`sdgraph run` end to end on toy nodes: in-process and as separate processes sharing a cache dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from graph_helpers import TOY_NODES, write

import cli

ROOT = Path(__file__).resolve().parents[1]

WF = """
params: {pos: a castle, neg: blurry, seed: 1}
nodes:
  model: {type: LoadToyModel}
  pos:   {type: Encode, model: {from: model.TOYMODEL}, text: $pos}
  neg:   {type: Encode, model: {from: model.TOYMODEL}, text: $neg}
  total: {type: SumVec, v: {from: pos.TOYVEC}, extra: {from: neg.TOYVEC}, seed: $seed}
  save:  {type: WriteText, text: {from: pos_text.STRING}, prefix: img}
  pos_text: {type: Concat, a: $pos, b: {from: seed_text.STRING}}
  seed_text: {type: ReadText, name: suffix.txt}
  num:   {type: WriteNumber, x: {from: total.TOTAL}, prefix: total}
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Toy nodes, a private cache dir and an execution log; cwd is tmp_path."""
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "suffix.txt").write_text("!")
    values = {"SDGRAPH_EXTRA_NODES": str(TOY_NODES), "SDGRAPH_CACHE_DIR": str(tmp_path / "cache"),
              "SDGRAPH_TEST_LOG": str(tmp_path / "executions.log")}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    return dict(os.environ, **values, PYTHONPATH=str(ROOT))


def sdgraph(env, *args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def log_lines(tmp_path) -> list[str]:
    path = tmp_path / "executions.log"
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
def test_caching_across_processes(tmp_path, env):
    wf = write(tmp_path, WF)
    first = json.loads(sdgraph(env, "run", str(wf), "--json").stdout)
    assert sorted(log_lines(tmp_path)) == sorted(
        ["LoadToyModel", "Encode", "Encode", "SumVec", "WriteText", "Concat", "ReadText", "WriteNumber"])
    assert {n["status"] for n in first["variations"][0]["nodes"]} == {"ran"}

    n = len(log_lines(tmp_path))
    again = json.loads(sdgraph(env, "run", str(wf), "--json").stdout)
    assert log_lines(tmp_path)[n:] == []  # an identical re-run executes no node
    status = {x["id"]: x["status"] for x in again["variations"][0]["nodes"]}
    assert status["save"] == status["num"] == "disk cache" and status["model"] == "not needed"
    assert again["files"] == first["files"] == ["output/img_00001.txt", "output/total.txt"]

    seed = json.loads(sdgraph(env, "run", str(wf), "--set", "total.seed=5", "--json").stdout)
    assert log_lines(tmp_path)[n:] == ["SumVec", "WriteNumber"]  # the encoder model is never loaded
    status = {x["id"]: x["status"] for x in seed["variations"][0]["nodes"]}
    assert (status["pos"], status["neg"], status["model"], status["save"]) == (
        "disk cache", "disk cache", "not needed", "disk cache")

    n = len(log_lines(tmp_path))
    sdgraph(env, "run", str(wf), "--set", "neg=noisy", "--quiet")
    assert sorted(log_lines(tmp_path)[n:]) == ["Encode", "LoadToyModel", "SumVec", "WriteNumber"]

    n = len(log_lines(tmp_path))
    (tmp_path / "input" / "suffix.txt").write_text("?")  # the file a node reads changed
    sdgraph(env, "run", str(wf), "--quiet")
    assert log_lines(tmp_path)[n:] == ["ReadText", "Concat", "WriteText"]
    assert (tmp_path / "output" / "img_00002.txt").read_text() == "a castle ?"


@pytest.mark.slow
def test_json_summary_shape_and_sweep_reuse(tmp_path, env):
    wf = write(tmp_path, WF)
    (tmp_path / "prompts.txt").write_text("a castle\na tower, at dusk\n")
    proc = sdgraph(env, "run", str(wf), "--sweep", "pos=@prompts.txt", "--sweep", "total.seed=1,2",
                   "--json", "--no-cache")
    summary = json.loads(proc.stdout)
    assert set(summary) == {"status", "workflow", "variations", "files"} and summary["status"] == "ok"
    assert len(summary["variations"]) == 4
    v = summary["variations"][3]
    assert set(v) == {"index", "id", "overrides", "nodes", "files"}
    assert v["overrides"] == {"pos": "a tower, at dusk", "total.seed": "2"} and v["index"] == 3
    assert set(v["nodes"][0]) == {"id", "type", "status", "seconds"}
    assert {n["status"] for var in summary["variations"] for n in var["nodes"]} <= {
        "ran", "memory cache", "disk cache", "not needed"}
    runs = log_lines(tmp_path)
    # one process: the model loads once, the negative prompt encodes once, each positive once
    assert runs.count("LoadToyModel") == 1 and runs.count("Encode") == 3 and runs.count("SumVec") == 4
    assert summary["files"] == [f for var in summary["variations"] for f in var["files"]]
    assert not (tmp_path / "cache").exists()  # --no-cache wrote nothing there


def test_table_and_progress_output(tmp_path, env, capsys):
    wf = write(tmp_path, """
        nodes:
          c: {type: Const, value: 2}
          slow: {type: Slow, x: {from: c.FLOAT}, steps: 4}
        """)
    assert cli.main(["run", str(wf)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["node", "type", "status", "seconds"]
    assert any(line.split()[:3] == ["slow", "Slow", "ran"] for line in out.splitlines())
    assert "output: output/slow.txt" in out
    assert "slow:" in err  # the tqdm bar
    assert cli.main(["run", str(wf), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "output/slow.txt" and err == ""


BROKEN = [
    ("range", "  v: {type: MakeVec, n: 5000}\n", 2, "node 'v' input 'n': 5000 is above the maximum 1000"),
    ("type", "  v: {type: MakeVek}\n", 2, "node 'v': unknown node type 'MakeVek' (did you mean 'MakeVec'?)"),
]


@pytest.mark.parametrize("name,line,lineno,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_invalid_workflow_exits_2_and_writes_nothing(tmp_path, env, capsys, name, line, lineno, message):
    wf = write(tmp_path, "nodes:\n" + line + "  w: {type: WriteNumber, x: 1.0}\n")
    assert cli.main(["run", str(wf), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{wf}:{lineno}: {message}" in err
    assert "nothing was run" in err
    assert not (tmp_path / "out").exists() and log_lines(tmp_path) == []


def test_bad_override_and_usage_exit_2(tmp_path, env, capsys):
    wf = write(tmp_path, WF)
    assert cli.main(["run", str(wf), "--set", "total.sed=3"]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err
    assert cli.main(["run", str(wf), "--set", "novalue"]) == 2
    assert cli.main(["run"]) == 2  # argparse usage error
    assert cli.main(["run", str(wf), "--json", "--set", "total.seed=-1"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "invalid" and out["errors"][0]["node"] == "total"
    assert not (tmp_path / "output").exists()


def test_runtime_failure_exits_1_names_the_node_and_removes_files(tmp_path, env, capsys, monkeypatch):
    wf = write(tmp_path, """
        nodes:
          c: {type: Const, value: 2}
          num: {type: WriteNumber, x: {from: c.FLOAT}}
          slow: {type: Slow, x: {from: c.FLOAT}, steps: 4, fail_at: 2}
        """)
    assert cli.main(["run", str(wf), "--json"]) == 1
    captured = capsys.readouterr()
    assert "error: node 'slow' (Slow) failed: RuntimeError: boom at step 2" in captured.err
    summary = json.loads(captured.out)
    assert summary["status"] == "failed" and summary["failed_node"] == "slow"
    assert list((tmp_path / "output").iterdir()) == []
    monkeypatch.setenv("SDGRAPH_DEBUG", "1")
    assert cli.main(["run", str(wf), "--quiet"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_no_partial_files(tmp_path, env):
    wf = write(tmp_path, """
        nodes:
          c: {type: Const, value: 2}
          hang: {type: Hang, x: {from: c.FLOAT}}
        """)
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", str(wf)],
                            env=dict(env, SDGRAPH_TEST_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "node never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list((tmp_path / "output").iterdir()) == []  # neither first.txt nor a temp file of hang.txt
