"""A reads_files resolver may name several files (or none): each is fingerprinted into the cache key."""

from __future__ import annotations

from pathlib import Path

import pytest
from graph_helpers import write

from graph import STRING, String, node
from graph.context import Folders
from graph.errors import ValidationFailed
from graph.importers import load_workflow
from graph.plan import make_plan
from graph.validate import validate


def files_named_in(text: str, folders) -> list[Path]:
    """Every word of `text` is a file in the input folder (none: an empty list)."""
    paths = [Path(folders.input_dir) / word for word in text.split()]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} is not in {folders.input_dir}")
    return paths


@node(category="toy", outputs=(STRING,), reads_files={"text": files_named_in})
def JoinFiles(text: String(), ctx=None):
    """Concatenate the files the text names."""
    return "".join((Path(ctx.input_dir) / w).read_text() for w in text.split())


@node(category="toy", output=True)
def DropText(text: String()):
    """A sink that keeps nothing."""


def key(tmp_path: Path, text: str) -> str:
    wf = write(tmp_path, f"""
        nodes:
          join: {{type: JoinFiles, text: "{text}"}}
          out:  {{type: DropText, text: {{from: join.STRING}}}}
        """)
    folders = Folders(tmp_path / "models", tmp_path / "input", tmp_path / "output")
    return make_plan(validate(load_workflow(wf), folders)).nodes["join"].key


def test_every_named_file_is_in_the_key(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "a.txt").write_text("a")
    (tmp_path / "input" / "b.txt").write_text("b")
    both = key(tmp_path, "a.txt b.txt")
    (tmp_path / "input" / "b.txt").write_text("changed")
    assert key(tmp_path, "a.txt b.txt") != both
    assert key(tmp_path, "b.txt a.txt") != key(tmp_path, "a.txt b.txt")  # in order


def test_no_file_named_keeps_the_plain_key(tmp_path):
    (tmp_path / "input").mkdir()
    empty = key(tmp_path, "")
    spec = JoinFiles.node_spec
    resolver = spec.reads_files.pop("text")
    try:
        assert key(tmp_path, "") == empty  # an empty list adds nothing to the key
    finally:
        spec.reads_files["text"] = resolver


def test_a_missing_one_is_a_validation_error(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "a.txt").write_text("a")
    with pytest.raises(ValidationFailed, match="nope.txt is not in"):
        key(tmp_path, "a.txt nope.txt")
