"""Overrides (`--set target=value`) and sweeps (`--sweep target=v1,v2` or `target=@values.txt`).

A target is `node.input` or a param name. Values are parsed by the target input's literal type.
Variations are the cartesian product of the sweeps, in the order given (the first sweep varies
slowest); the list is deterministic, and each variation has a stable id derived from its overrides,
so the same variation gets the same id however the list is split (e.g. across distributed ranks).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graph import yaml_loader
from graph.declare import NODE_REGISTRY
from graph.errors import Problem, ValidationFailed, did_you_mean
from graph.workflow import ParamRef, Workflow


@dataclass(frozen=True)
class Variation:
    index: int
    id: str
    overrides: dict[str, str]  # target -> value text as given on the command line

    def to_data(self) -> dict:
        return {"index": self.index, "id": self.id, "overrides": dict(self.overrides)}


def parse_assignment(text: str, flag: str = "--set") -> tuple[str, str]:
    target, sep, value = text.partition("=")
    if not sep or not target.strip():
        raise ValidationFailed([Problem(f"{flag} {text!r}: expected TARGET=VALUE (e.g. sampler.seed=7)")])
    return target.strip(), value


def parse_sweep(text: str, base_dir: Path | None = None) -> tuple[str, list[str]]:
    """`target=1,2,3` or `target=@file` (one value per line; blank lines skipped)."""
    target, raw = parse_assignment(text, "--sweep")
    if raw.startswith("@"):
        path = Path(raw[1:])
        if base_dir is not None and not path.is_absolute() and not path.exists():
            path = base_dir / path
        try:
            values = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise ValidationFailed([Problem(f"--sweep {text!r}: cannot read {path}: {e.strerror}")]) from e
    else:
        values = raw.split(",")
    if not values:
        raise ValidationFailed([Problem(f"--sweep {text!r}: no values")])
    return target, list(dict.fromkeys(values))  # a repeated value would repeat a variation and its id


def make_variations(sets: list[tuple[str, str]], sweeps: list[tuple[str, list[str]]]) -> list[Variation]:
    base = dict(sets)
    targets = [t for t, _ in sweeps]
    result = []
    for index, combo in enumerate(itertools.product(*(values for _, values in sweeps))):
        overrides = base | dict(zip(targets, combo, strict=True))
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]
        result.append(Variation(index, digest, overrides))
    return result


def apply_overrides(wf: Workflow, overrides: dict[str, str]) -> tuple[Workflow, dict[str, Any]]:
    """A copy of `wf` with the overrides applied, and the parsed values (for run_info).
    Raises ValidationFailed naming every bad target or value."""
    out = wf.copy()
    parsed: dict[str, Any] = {}
    problems: list[Problem] = []
    for target, raw in overrides.items():
        try:
            parsed[target] = _apply_one(out, target, raw)
        except _Bad as e:
            problems.append(Problem(f"override {target}={_short(raw)}: {e.message}", node=e.node,
                                    input=e.input, hint=e.hint))
    if problems:
        raise ValidationFailed(problems)
    return out, parsed


class _Bad(Exception):
    def __init__(self, message: str, node: str | None = None, input: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message, self.node, self.input, self.hint = message, node, input, hint


def _apply_one(wf: Workflow, target: str, raw: str) -> Any:
    node_id, dot, input_name = target.partition(".")
    if not dot:
        return _apply_param(wf, target, raw)
    if node_id not in wf.nodes and node_id in wf.node_aliases:  # ComfyUI's "3" for our "sampler_3"
        node_id = wf.node_aliases[node_id]
    decl = wf.nodes.get(node_id)
    if decl is None:
        raise _Bad(f"no node '{node_id}'", hint=did_you_mean(node_id, list(wf.nodes) + list(wf.params)))
    spec = NODE_REGISTRY.get(decl.type)
    if spec is None:
        raise _Bad(f"unknown node type '{decl.type}'", node_id)
    inp = spec.inputs.get(input_name)
    if inp is None:
        raise _Bad(f"{decl.type} has no input '{input_name}'", node_id, input_name,
                   did_you_mean(input_name, spec.inputs))
    if inp.is_socket:
        raise _Bad(f"'{input_name}' is a {inp.type_name} link, not a value", node_id, input_name)
    try:
        value = inp.type.parse(raw)
    except ValueError as e:
        raise _Bad(str(e), node_id, input_name) from e
    decl.inputs[input_name] = value
    return value


def _apply_param(wf: Workflow, name: str, raw: str) -> Any:
    if name not in wf.params:
        names = list(wf.params) + list(wf.nodes)
        raise _Bad(f"no param '{name}' (use node.input for a node's input)", hint=did_you_mean(name, names))
    user = _first_literal_user(wf, name)
    if user is not None:  # parse by the type of an input that uses the param
        node_id, input_name, literal_type = user
        try:
            value = literal_type.parse(raw)
        except ValueError as e:
            raise _Bad(str(e), node_id, input_name) from e
    else:
        try:
            value = yaml_loader.load_value(raw)
        except ValueError as e:
            raise _Bad(str(e)) from e
    wf.params[name] = value
    return value


def _first_literal_user(wf: Workflow, param: str):
    for decl in wf.nodes.values():
        spec = NODE_REGISTRY.get(decl.type)
        for input_name, ref in decl.inputs.items():
            inp = spec.inputs.get(input_name) if spec else None
            if ref == ParamRef(param) and inp is not None and not inp.is_socket:
                return decl.id, input_name, inp.type
    return None


def _short(raw: str, limit: int = 80) -> str:
    """An override's text for a message: a 5,000-character value is shown by its start and length."""
    return repr(raw) if len(raw) <= limit else f"{raw[:limit // 2]!r}... ({len(raw):,} characters)"
