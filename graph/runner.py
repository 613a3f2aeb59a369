"""Run a workflow with overrides and sweeps: validate every variation first, then run them one after
another through one Executor (so its caches carry over between variations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graph.context import Folders
from graph.errors import Problem, ValidationFailed
from graph.executor import Executor, RunResult
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
            prepared.append(PreparedVariation(variation, effective, parsed, validate(effective, folders)))
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


def display_path(path: str) -> str:
    """Relative to the current folder when inside it (shorter to read), else absolute."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
