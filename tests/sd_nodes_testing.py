"""Shared helpers for the SD node tests: one set of tiny random models per session (written by
`nodes.demo.make_demo`), a fresh output/cache folder per test, and the real CLI run in-process or in a
new process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nodes  # noqa: F401  (registers the SD nodes)
from nodes import models
from nodes.demo import make_demo

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
DATA = Path(__file__).resolve().parent / "data"
SMALL = ["--set", "width=64", "--set", "height=64", "--set", "steps=2"]

_SHARED: dict[str, Path] = {}


def shared_models(tmp_path_factory) -> Path:
    """models/ and input/ with the demo stand-ins (64x64 example.png), made once per session."""
    if "root" not in _SHARED:
        root = tmp_path_factory.mktemp("sd-world")
        make_demo(root / "models", root / "input", image_size=64, out=io.StringIO())
        _SHARED["root"] = root
    return _SHARED["root"]


@dataclass
class World:
    models: Path
    input: Path
    output: Path
    cache: Path

    def folder_args(self, cache: bool = True) -> list[str]:
        args = ["--models-dir", str(self.models), "--input-dir", str(self.input),
                "--output-dir", str(self.output)]
        return args + (["--cache-dir", str(self.cache)] if cache else ["--no-cache"])

    @property
    def checkpoint(self) -> Path:
        return self.models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"

    def pngs(self) -> list[Path]:
        return sorted(self.output.rglob("*.png")) if self.output.exists() else []


def make_world(tmp_path_factory, tmp_path: Path) -> World:
    root = shared_models(tmp_path_factory)
    return World(root / "models", root / "input", tmp_path / "output", tmp_path / "cache")


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)

    def statuses(self, variation: int = 0) -> dict[str, str]:
        return {n["id"]: n["status"] for n in self.json["variations"][variation]["nodes"]}


def run_cli(*args: str) -> CliResult:
    """The real CLI in this process (stdout/stderr captured); nodes.models.LOAD_COUNTS counts loads."""
    import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return CliResult(rc, out.getvalue(), err.getvalue())


def run(world: World, workflow: Path | str, *extra: str, cache: bool = True,
        as_json: bool = True) -> CliResult:
    args = ["run", str(workflow), *world.folder_args(cache), *extra]
    return run_cli(*args, *(["--json"] if as_json else []))


_CHILD = """
import json, sys
import cli
from nodes import models
rc = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "loads": dict(models.LOAD_COUNTS)}, f)
"""


def run_in_new_process(world: World, workflow: Path | str, *extra: str, tmp: Path) -> tuple[CliResult, dict]:
    """The CLI in a fresh Python process: returns its result and what it loaded from disk."""
    report = tmp / f"child-{os.getpid()}-{len(list(tmp.glob('child-*')))}.json"
    args = ["run", str(workflow), *world.folder_args(), "--json", *extra]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(report), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    data = json.loads(report.read_text())
    return CliResult(data["rc"], proc.stdout, proc.stderr), data["loads"]


def reset_loads() -> None:
    """Forget loaded models and counts, as if this process had just started."""
    models.clear()
    models.LOAD_COUNTS.clear()


def png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return dict(img.text)


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
