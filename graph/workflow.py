"""The workflow data model (one for YAML and JSON) and loading it from our file format.

    params: {seed: 42, prompt: "a castle"}
    nodes:
      ckpt:    {type: LoadCheckpoint, ckpt_name: model.safetensors}
      pos:     {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: $prompt}
      sampler: {type: KSampler, model: {from: ckpt.MODEL}, seed: $seed}

A link is always an explicit object `{from: node.OUTPUT}` (or `node.0` by index), so a literal such as
`model.safetensors` is never taken for one. A string `$name` references a param; `$$x` is the literal `$x`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph.declare import canonical_type
from graph.errors import ValidationFailed
from graph.schema import check_structure
from graph.source_text import Lines, parse_text


@dataclass(frozen=True)
class Link:
    node: str
    output: str | int

    def to_data(self) -> dict:
        return {"from": f"{self.node}.{self.output}"}


@dataclass(frozen=True)
class ParamRef:
    name: str


@dataclass
class NodeDecl:
    id: str
    type: str
    inputs: dict[str, Any]  # input name -> Link | ParamRef | literal value


@dataclass
class SourceMap:
    """Where things were written: key path -> line, for error messages."""

    file: str | None = None
    lines: Lines = field(default_factory=dict)

    def line(self, *path: Any) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def node_line(self, node_id: str, input_name: str | None = None) -> int | None:
        return self.line("nodes", node_id, input_name) if input_name else self.line("nodes", node_id)


@dataclass
class Workflow:
    nodes: dict[str, NodeDecl]
    params: dict[str, Any] = field(default_factory=dict)
    source: SourceMap = field(default_factory=SourceMap)
    description: str | None = None
    node_aliases: dict[str, str] = field(default_factory=dict)  # an importer's original id -> ours
    notes: list[str] = field(default_factory=list)  # what an importer left out or changed, for the user

    def to_data(self) -> dict:
        """Our file format as plain data (for YAML/JSON output and PNG metadata)."""
        data: dict[str, Any] = {}
        if self.description:
            data["description"] = self.description
        if self.params:
            data["params"] = copy.deepcopy(self.params)
        data["nodes"] = {
            n.id: {"type": n.type} | {k: _value_to_data(v) for k, v in n.inputs.items()}
            for n in self.nodes.values()
        }
        return data

    def copy(self) -> Workflow:
        nodes = {i: NodeDecl(n.id, n.type, dict(n.inputs)) for i, n in self.nodes.items()}
        return Workflow(nodes, copy.deepcopy(self.params), self.source, self.description,
                        dict(self.node_aliases), list(self.notes))


def _value_to_data(value: Any) -> Any:
    if isinstance(value, Link):
        return value.to_data()
    if isinstance(value, ParamRef):
        return f"${value.name}"
    if isinstance(value, str) and value.startswith("$"):
        return "$" + value  # escape so it reads back as the same literal
    return value


def _value_from_data(value: Any) -> Any:
    if isinstance(value, dict):
        node, _, output = value["from"].partition(".")
        return Link(node, int(output) if output.isdigit() else output)
    if isinstance(value, str) and value.startswith("$"):
        return value[1:] if value.startswith("$$") else ParamRef(value[1:])
    return value


def workflow_from_data(data: Any, source: SourceMap | None = None) -> Workflow:
    """Check the structure against the shipped JSON Schema, then build the Workflow."""
    source = source or SourceMap()
    problems = check_structure(data, source.lines, source.file)
    if problems:
        raise ValidationFailed(problems)
    nodes = {
        node_id: NodeDecl(node_id, canonical_type(body["type"]),
                          {k: _value_from_data(v) for k, v in body.items() if k != "type"})
        for node_id, body in data["nodes"].items()
    }
    return Workflow(nodes, dict(data.get("params") or {}), source, data.get("description"))


def parse_workflow(text: str, filename: str, fmt: str) -> Workflow:
    data, lines = parse_text(text, filename, fmt)
    return workflow_from_data(data, SourceMap(filename, lines))


def load_workflow_file(path: str | Path) -> Workflow:
    """Load our own YAML or JSON format (other formats go through graph.importers)."""
    path = Path(path)
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    return parse_workflow(path.read_text(encoding="utf-8"), str(path), fmt)
