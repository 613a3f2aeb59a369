"""The workflow file's JSON Schema (shipped as graph/workflow.schema.json) and its enforcement."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from graph.errors import Problem

SCHEMA_PATH = Path(__file__).with_name("workflow.schema.json")


@cache
def workflow_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_with_nodes(specs) -> dict:
    """The file schema plus one exact sub-schema per registered node type (for editors)."""
    schema = copy.deepcopy(workflow_schema())
    if specs:
        by_type = [spec.input_schema() for spec in specs]
        schema["$defs"]["node"] = {"oneOf": by_type} if by_type else schema["$defs"]["node"]
    return schema


def check_structure(data: Any, lines: dict[tuple, int], filename: str | None) -> list[Problem]:
    """Structural problems (shape, names, link syntax), each located at the closest known line."""
    validator = jsonschema.Draft202012Validator(workflow_schema())
    problems = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        path = tuple(err.absolute_path)
        if "propertyNames" in err.schema_path:
            path = path + (err.instance,)
        elif err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = err.schema.get("properties", {})
            extra = [k for k in err.instance if k not in allowed]
            path = path + tuple(extra[:1])
        node = str(path[1]) if len(path) >= 2 and path[0] == "nodes" else None
        inp = str(path[2]) if len(path) >= 3 and path[0] == "nodes" else None
        problems.append(Problem(_message(err), filename, _closest_line(lines, path), node, inp))
    return problems


def _message(err: jsonschema.ValidationError) -> str:
    if not err.absolute_path and err.validator == "type":
        empty = " (the file is empty)" if err.instance is None else ""
        return f"a workflow is a mapping with a 'nodes:' section{empty}"
    if err.validator == "minProperties" and tuple(err.absolute_path) == ("nodes",):
        return "'nodes' is empty: a workflow needs at least one node"
    if err.validator == "anyOf" and isinstance(err.instance, dict):
        link = err.instance.get("from")
        if set(err.instance) == {"from"}:
            return (f"bad link {{from: {link!r}}}: write node.OUTPUT by name or index "
                    "(e.g. {from: ckpt.MODEL} or {from: ckpt.0})")
        return "a dict here must be a link like {from: node.OUTPUT}, with no other keys"
    if "propertyNames" in err.schema_path:
        return f"{err.instance!r} is not a valid name (letters, digits, '_' and '-'; no dots)"
    if err.validator == "additionalProperties" and not err.absolute_path:
        return err.message + " (allowed top-level keys: sdgraph, description, params, nodes)"
    return err.message


def _closest_line(lines: dict[tuple, int], path: tuple) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return 1 if lines else None
