"""File names resolve as ComfyUI's folder_paths does, plus absolute and relative paths; a missing file
lists what the folder holds."""

from __future__ import annotations

import pytest

from graph import Folders
from nodes.paths import resolve_checkpoint, resolve_image, resolve_lora


@pytest.fixture
def folders(tmp_path):
    for rel in ("models/checkpoints/a.safetensors", "models/checkpoints/sd15/b.ckpt",
                "models/checkpoints/notes.txt", "models/loras/style.safetensors", "input/cat.png",
                "output/prev_00001_.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    return Folders(tmp_path / "models", tmp_path / "input", tmp_path / "output")


def test_names_with_subfolders_resolve_inside_the_folder(folders):
    expected = folders.models_dir / "checkpoints" / "a.safetensors"
    assert resolve_checkpoint("a.safetensors", folders) == expected
    assert resolve_checkpoint("sd15/b.ckpt", folders).name == "b.ckpt"
    assert resolve_checkpoint("sd15\\b.ckpt", folders).name == "b.ckpt"  # written by ComfyUI on Windows
    assert resolve_lora("style.safetensors", folders).parent.name == "loras"
    assert resolve_image("cat.png", folders).parent == folders.input_dir


def test_absolute_and_relative_paths_are_accepted(folders, tmp_path, monkeypatch):
    absolute = folders.models_dir / "checkpoints" / "sd15" / "b.ckpt"
    assert resolve_checkpoint(str(absolute), folders) == absolute
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("models/checkpoints/a.safetensors", folders).exists()


def test_comfy_annotated_image_names(folders):
    assert resolve_image("cat.png [input]", folders).parent == folders.input_dir
    assert resolve_image("prev_00001_.png [output]", folders).parent == folders.output_dir


def test_missing_file_lists_what_is_there(folders):
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint("v1-5.safetensors", folders)
    message = str(e.value)
    assert "checkpoint 'v1-5.safetensors' not found in" in message
    assert "available there: a.safetensors, sd15/b.ckpt" in message and "notes.txt" not in message
    assert "--models-dir" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint("x.safetensors", Folders(folders.models_dir / "nowhere"))
