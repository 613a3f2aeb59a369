"""The other sdgraph commands: help, validate, nodes, schema, convert, cache."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from graph_helpers import TOY_NODES, write

import cli
from graph.importers import load_workflow, register_importer
from graph.workflow import Link, NodeDecl, Workflow


@pytest.fixture(autouse=True)
def toy_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SDGRAPH_EXTRA_NODES", str(TOY_NODES))
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def test_help_lists_commands_and_examples(capsys):
    assert cli.main([]) == 0
    assert "sdgraph" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("run", "validate", "nodes", "schema", "convert", "cache", "demo", "doctor", "examples:"):
        assert word in out


def test_validate_ok_and_invalid(tmp_path, capsys):
    good = write(tmp_path, "nodes:\n  c: {type: Const}\n  w: {type: WriteNumber, x: {from: c.FLOAT}}\n")
    assert cli.main(["validate", str(good), "--sweep", "c.value=1,2"]) == 0
    assert "ok (2 nodes, 2 variations)" in capsys.readouterr().out
    bad = write(tmp_path, "nodes:\n  c: {type: Const, value: x}\n", "bad.yaml")
    assert cli.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: node 'c' input 'value': expected a number" in err
    assert not (tmp_path / "output").exists()


def test_nodes_list_and_describe(capsys):
    assert cli.main(["nodes"]) == 0
    out = capsys.readouterr().out
    assert "toy:" in out and "SumVec" in out and "Sum a vector" in out
    assert cli.main(["nodes", "SumVec"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "INT [0, 18446744073709551615]" in out and "outputs: TOTAL (FLOAT)" in out
    assert cli.main(["nodes", "Concat"]) == 0
    assert "one of:" in capsys.readouterr().out
    assert cli.main(["nodes", "Sumvec"]) == 2
    assert "did you mean 'SumVec'" in capsys.readouterr().err


def test_schema_prints_the_shipped_schema(capsys):
    assert cli.main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == ["nodes"]
    assert cli.main(["schema", "--with-nodes"]) == 0
    assert "SumVec" in capsys.readouterr().out


def test_convert_yaml_json_round_trip(tmp_path):
    src = write(tmp_path, """
        params: {seed: 3}
        nodes:
          v: {type: MakeVec, fill: 2.5}
          s: {type: SumVec, v: {from: v.TOYVEC}, seed: $seed}
          c: {type: Concat, a: $$literal, b: model.safetensors}
          w: {type: WriteNumber, x: {from: s.TOTAL}}
        """)
    assert cli.main(["convert", str(src), "-o", str(tmp_path / "wf.json")]) == 0
    data = json.loads((tmp_path / "wf.json").read_text())
    assert data["nodes"]["s"] == {"type": "SumVec", "v": {"from": "v.TOYVEC"}, "seed": "$seed"}
    assert data["nodes"]["c"]["a"] == "$$literal"
    assert cli.main(["convert", str(tmp_path / "wf.json"), "-o", str(tmp_path / "back.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "back.yaml").read_text()) == yaml.safe_load(src.read_text())
    assert load_workflow(tmp_path / "back.yaml").to_data() == load_workflow(src).to_data()


def test_registered_importer_is_sniffed(tmp_path, capsys):
    def load(path):
        nodes = {"c": NodeDecl("c", "Const", {"value": 4.0}),
                 "w": NodeDecl("w", "WriteNumber", {"x": Link("c", 0)})}
        return Workflow(nodes)

    register_importer("toy-format", lambda path, head: head.startswith(b"TOY"), load)
    (tmp_path / "wf.toy").write_bytes(b"TOY workflow")
    assert cli.main(["convert", str(tmp_path / "wf.toy"), "-o", str(tmp_path / "out.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["nodes"]["w"] == {
        "type": "WriteNumber", "x": {"from": "c.0"}}
    assert cli.main(["run", str(tmp_path / "wf.toy"), "--quiet"]) == 0
    assert (tmp_path / "output" / "num.txt").read_text() == "4.0"
    (tmp_path / "wf.txt").write_text("?")
    assert cli.main(["run", str(tmp_path / "wf.txt")]) == 2
    assert "unknown workflow format" in capsys.readouterr().err


def test_cache_info_and_clear(tmp_path, capsys):
    wf = write(tmp_path, "nodes:\n  c: {type: Const}\n  w: {type: WriteNumber, x: {from: c.FLOAT}}\n")
    assert cli.main(["run", str(wf), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cache") in out and "entries:       2" in out
    assert cli.main(["cache", "clear"]) == 0
    capsys.readouterr()
    assert cli.main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "entries:       0" in capsys.readouterr().out


@pytest.mark.slow
def test_examples_outside_a_checkout_are_pointed_to_and_copied_by_demo(tmp_path, capsys, monkeypatch):
    """Installed into another environment, `sdgraph run workflows/txt2img.yaml` (as the README says) found
    nothing and said nothing of where the examples went (issue 21): the error names the installed file, and
    `sdgraph demo` copies the examples next to its stand-ins, never over a user's file."""
    monkeypatch.delenv("SDGRAPH_EXTRA_NODES")
    assert cli.main(["validate", "workflows/txt2img.yaml"]) == 2
    err = capsys.readouterr().err
    assert "one of sdgraph's examples, installed at" in err and "sdgraph demo" in err
    (tmp_path / "workflows").mkdir()
    mine = tmp_path / "workflows" / "img2img.yaml"
    mine.write_text("# mine\n")
    assert cli.main(["demo"]) == 0
    assert "copied" in capsys.readouterr().out
    assert mine.read_text() == "# mine\n"
    assert cli.main(["validate", "workflows/txt2img.yaml", "--set", "width=64", "--set", "height=64"]) == 0
    assert cli.main(["validate", "workflows/prompt_sweep.yaml"]) == 0  # its prompts.txt came along


def test_setup_script_is_quiet_but_not_silent_on_failure():
    """A newcomer's set-up printed pip's and setuptools' advisory warnings (issue 21): every pip install in
    scripts/setup.sh runs at errors-only verbosity under `set -e`, so a failure still prints and stops."""
    from pathlib import Path

    text = (Path(cli.__file__).parent / "scripts" / "setup.sh").read_text()
    installs = [line for line in text.splitlines()
                if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all(" -qq " in line for line in installs), installs
    assert "set -euo pipefail" in text and "PIP_ROOT_USER_ACTION=ignore" in text


@pytest.mark.slow
def test_warmup_runs_each_size_once_and_leaves_no_images(tmp_path, capsys, monkeypatch):
    """`sdgraph warmup` (issue 14): compile ahead of time for a checkpoint and sizes; no image is kept."""
    monkeypatch.delenv("SDGRAPH_EXTRA_NODES")
    assert cli.main(["demo"]) == 0
    capsys.readouterr()
    assert cli.main(["warmup", "--size", "64x64", "--size", "64X96"]) == 0
    out = capsys.readouterr().out
    assert "warmed up 64x64 (batch 1)" in out and "warmed up 64x96 (batch 1)" in out
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").iterdir())
    assert cli.main(["warmup", "--size", "big"]) == 2
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err
    assert cli.main(["warmup", "--ckpt", "missing.safetensors"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert cli.main(["cache", "info"]) == 0
    assert "kernels:" in capsys.readouterr().out


def test_cache_info_counts_the_kernels_it_keeps(tmp_path):
    folder = tmp_path / "kernels"
    (folder / "mlx-0.32.4-ptx").mkdir(parents=True)
    (folder / "mlx-0.32.4-ptx" / "a.ptx").write_bytes(b"x" * 10)
    (folder / "cuda-k-sm_90-1.cubin").write_bytes(b"y" * 5)
    (folder / "cuda-k-sm_90-1.cubin.sha256").write_text("0")
    (folder / "cpu_kernels-1.so").write_bytes(b"z")
    (folder / ".build-1-x.so").write_bytes(b"half")
    counts = cli._kernel_counts(folder)
    assert counts == {"CPU kernel libraries": (1, 1), "sdgraph GPU kernels": (1, 5),
                      "MLX GPU kernels": (1, 10)}
