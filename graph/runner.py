"""Run a workflow with overrides and sweeps: validate every variation first (`prepare`), then run them one
after another through one Executor, so its caches carry over between variations (`run_variations`).

`run_variations` is the one run loop: `sdgraph run`, `sdgraph doctor` and each rank of a distributed sweep
call it with their executor and report its outcomes in their own way (table, JSON, manifest).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graph.context import Folders
from graph.errors import Cancelled, GraphError, NodeFailed, Problem, ValidationFailed
from graph.executor import Executor, RunEvents, RunResult, open_caches
from graph.memory_plan import check_memory
from graph.plan import make_plan
from graph.sweep import Variation, apply_overrides, make_variations
from graph.validate import BoundNode, validate
from graph.workflow import Workflow


@dataclass
class PreparedVariation:
    variation: Variation
    workflow: Workflow                 # with the overrides applied
    overrides: dict[str, Any]          # parsed values
    bound: dict[str, BoundNode]

    def run_info(self) -> dict[str, Any]:
        """What a node may record about how its output was made (e.g. in PNG metadata)."""
        return {"workflow": self.workflow.to_data(), "overrides": self.overrides,
                "variation": self.variation.to_data()}


def prepare(wf: Workflow, sets: list[tuple[str, str]], sweeps: list[tuple[str, list[str]]],
            folders: Folders | None) -> list[PreparedVariation]:
    """Validate the workflow under every variation; raise ValidationFailed listing each distinct problem."""
    prepared: list[PreparedVariation] = []
    problems: list[Problem] = []
    for variation in make_variations(sets, sweeps):
        try:
            effective, parsed = apply_overrides(wf, variation.overrides)
            bound = validate(effective, folders)
            check_memory(bound, effective.source)  # a plan that cannot fit is refused before running
            prepared.append(PreparedVariation(variation, effective, parsed, bound))
        except ValidationFailed as e:
            problems.extend(p for p in e.problems if str(p) not in {str(q) for q in problems})
    if problems:
        raise ValidationFailed(problems)
    return prepared


def run_variation(executor: Executor, pv: PreparedVariation) -> RunResult:
    try:
        plan = make_plan(pv.bound, executor.caches.fingerprints)
    except OSError as e:  # a file validated a moment ago has gone
        raise ValidationFailed([Problem(f"cannot read {e.filename}: {e.strerror}")]) from e
    return executor.run(plan, pv.run_info())


@dataclass
class Outcome:
    """One variation's run: its result, or (run_variations(keep_going=True)) the error that stopped it."""
    pv: PreparedVariation
    result: RunResult | None
    error: Exception | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self, **extra: Any) -> dict:
        """JSON-ready: the variation, `extra`, status, seconds, files (display paths) and node reports, or
        the error and the failing node."""
        base = self.pv.variation.to_data() | extra
        seconds = round(self.seconds, 4)
        e = self.error
        if e is not None:
            error = str(e) if isinstance(e, GraphError) else f"{type(e).__name__}: {e}"
            return base | {"status": "failed", "seconds": seconds, "files": [], "error": error,
                           "failed_node": e.node_id if isinstance(e, NodeFailed) else None}
        return base | {"status": "ok", "seconds": seconds,
                       "files": [display_path(f) for f in self.result.files],
                       "nodes": [r.to_data() for r in self.result.nodes]}


def run_variations(executor: Executor, prepared: list[PreparedVariation], *, keep_going: bool = False,
                   before: Callable[[PreparedVariation, int], None] | None = None) -> Iterator[Outcome]:
    """Run the variations in order through `executor`, yielding each Outcome as it finishes.

    `before(pv, count)` is called before each one runs (e.g. to announce it). A failing variation raises,
    unless `keep_going`: then its Outcome carries the error and the next one runs. Interrupts (Ctrl-C,
    Cancelled) always raise."""
    for pv in prepared:
        if before is not None:
            before(pv, len(prepared))
        start = time.perf_counter()
        try:
            result = run_variation(executor, pv)
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as e:  # one bad variation must not cost the rest of a sweep
            if not keep_going:
                raise
            yield Outcome(pv, None, e, time.perf_counter() - start)
            continue
        yield Outcome(pv, result, None, time.perf_counter() - start)


@contextlib.contextmanager
def open_executor(cache_dir: str | Path | None, no_cache: bool, folders: Folders,
                  events: RunEvents | None = None) -> Iterator[Executor]:
    """An Executor over the caches in `cache_dir` (default: the user cache folder), or with `no_cache` a
    throwaway folder that is removed on exit."""
    caches, tmp = open_caches(cache_dir, no_cache)
    try:
        yield Executor(caches, folders, events)
    finally:
        if tmp is not None:
            tmp.cleanup()


def display_path(path: str) -> str:
    """Relative to the current folder when inside it (shorter to read), else absolute."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
