"""Atomic output files and the folders' defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from graph.context import Folders, atomic_path


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
        assert not target.exists()  # nobody sees the file before it is complete
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("two, partial")
        raise RuntimeError("failed mid-write")
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_exclusive_publish_never_overwrites(tmp_path):
    target = tmp_path / "img_00001_.png"
    target.write_text("first")
    with pytest.raises(FileExistsError), atomic_path(target, overwrite=False) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["img_00001_.png"]
    with atomic_path(tmp_path / "img_00002_.png", overwrite=False) as tmp:
        tmp.write_text("second")
    assert (tmp_path / "img_00002_.png").read_text() == "second"


def test_folders_follow_arguments_then_env_then_comfyui_defaults(monkeypatch):
    for name in ("SDGRAPH_MODELS_DIR", "SDGRAPH_INPUT_DIR", "SDGRAPH_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert Folders.from_env() == Folders(Path("models"), Path("input"), Path("output"))
    monkeypatch.setenv("SDGRAPH_MODELS_DIR", "/m")
    monkeypatch.setenv("SDGRAPH_OUTPUT_DIR", "/o")
    f = Folders.from_env(output_dir="here")
    assert (f.models_dir, f.input_dir, f.output_dir) == (Path("/m"), Path("input"), Path("here"))
