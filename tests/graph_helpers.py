"""Shared helpers for the graph engine tests: write a workflow, validate it, run it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import graph_toy_nodes  # noqa: F401  (registers the toy nodes)

from graph.context import Folders
from graph.disk_cache import DiskCache
from graph.errors import Problem, ValidationFailed
from graph.executor import Caches, Executor, RunResult
from graph.importers import load_workflow
from graph.plan import make_plan
from graph.validate import validate

TOY_NODES = Path(graph_toy_nodes.__file__)


def write(tmp: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_of(path: Path, folders: Folders | None = None) -> list[Problem]:
    try:
        validate(load_workflow(path), folders)
    except ValidationFailed as e:
        return e.problems
    return []


class Runner:
    """One process's engine: shared caches across calls, like a sweep."""

    def __init__(self, tmp: Path, disk: bool = True, cache_dir: Path | None = None):
        self.cache_dir = cache_dir or tmp / "cache"
        self.folders = Folders(tmp / "models", tmp / "input", tmp / "output")
        caches = Caches(self.cache_dir, DiskCache(self.cache_dir) if disk else None)
        self.executor = Executor(caches, self.folders)

    def run(self, path: Path) -> RunResult:
        bound = validate(load_workflow(path), self.folders)
        return self.executor.run(make_plan(bound, self.executor.caches.fingerprints))


def statuses(result: RunResult) -> dict[str, str]:
    return {r.id: r.status for r in result.nodes}


def executions() -> list[str]:
    return graph_toy_nodes.EXECUTIONS
