"""Import ComfyUI API-format workflows (`Save (API Format)`): {"id": {"class_type", "inputs"}} with
links written ["id", output index]. Registered with graph.importers, so `sdgraph run/convert/validate`
accept such files. Classes without an sdgraph equivalent are listed together in one error. A missing
required input is refused, as ComfyUI's validation refuses it. UI-format files (the editor's own) are
first turned into this format by nodes/comfy_ui_import.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from graph.declare import alias, get_spec
from graph.errors import Problem, ValidationFailed
from graph.importers import register_importer
from graph.source_text import parse_text
from graph.workflow import Link, NodeDecl, SourceMap, Workflow
from nodes.comfy_table import COMFY_TO_OURS, SKIPPABLE, Mapping, mapping_for


def is_comfy_api(data: Any) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def _node_id(comfy_id: str, slug: str, taken: set[str]) -> str:
    """A readable id that keeps ComfyUI's number: "3" (KSampler) -> "sampler_3"."""
    base = f"{slug}_{re.sub(r'[^A-Za-z0-9_-]', '_', str(comfy_id))}"
    node_id, n = base, 2
    while node_id in taken:
        node_id, n = f"{base}_{n}", n + 1
    taken.add(node_id)
    return node_id


def workflow_from_comfy(data: dict, filename: str | None = None, lines: dict | None = None,
                        description: str | None = None, strict: bool = True,
                        notes: list[str] | None = None) -> Workflow:
    """Translate API-format data; raise ValidationFailed (one problem per unsupported class type).

    strict: refuse a missing required input, as ComfyUI's own validation does for an API file (a UI file's
    widgets fall back to the node's defaults in ComfyUI, so the UI importer passes False)."""
    lines = lines or {}
    notes = list(notes or [])
    if isinstance(data.get("prompt"), dict) and is_comfy_api(data["prompt"]):
        data = data["prompt"]  # the body sent to ComfyUI's /prompt endpoint
        lines = {k[1:]: v for k, v in lines.items() if k and k[0] == "prompt"}
    if not is_comfy_api(data):
        raise ValidationFailed([Problem("not a ComfyUI API-format workflow: expected an object of "
                                        '{"id": {"class_type": ..., "inputs": {...}}}', filename, 1)])
    unsupported: dict[str, list[str]] = {}
    skipped: dict[str, list[str]] = {}
    for comfy_id, body in data.items():
        cls = body["class_type"]
        if not isinstance(cls, str) or mapping_for(cls) is None:
            where = skipped if cls in SKIPPABLE else unsupported
            where.setdefault(str(cls), []).append(str(comfy_id))
    if unsupported:
        listed = "; ".join(f"{cls} (node {', '.join(ids)})" for cls, ids in sorted(unsupported.items()))
        supported = ", ".join(sorted(COMFY_TO_OURS))
        first = next(iter(unsupported.values()))[0]
        raise ValidationFailed([Problem(
            f"{len(unsupported)} ComfyUI node type(s) have no sdgraph equivalent: {listed}",
            filename, lines.get((first,)),
            hint=f"supported: {supported}; `sdgraph nodes` lists every node type")])
    for cls, skipped_ids in sorted(skipped.items()):
        notes.append(f"left out {cls} (node {', '.join(skipped_ids)}): it only shows an image in ComfyUI's "
                     "window")
    data = {cid: body for cid, body in data.items() if body["class_type"] not in skipped}

    taken: set[str] = set()
    ids = {str(cid): _node_id(cid, mapping_for(body["class_type"]).slug, taken) for cid, body in data.items()}
    nodes: dict[str, NodeDecl] = {}
    source = SourceMap(filename)
    problems: list[Problem] = []
    for comfy_id, body in data.items():
        mapping = mapping_for(body["class_type"])
        node_id = ids[str(comfy_id)]
        source.lines[("nodes", node_id)] = lines.get((comfy_id,)) or lines.get((comfy_id, "class_type"))
        inputs: dict[str, Any] = {}
        raw_inputs = body.get("inputs") or {}
        if not isinstance(raw_inputs, dict):
            problems.append(Problem("'inputs' must be an object", filename, lines.get((comfy_id,)), node_id))
            continue
        for name, value in raw_inputs.items():
            if name in mapping.ignored:
                continue
            ours = mapping.rename(name)
            if line := lines.get((comfy_id, "inputs", name)):
                source.lines[("nodes", node_id, ours)] = line
            if _is_link(value):
                link = _translate_link(value, data, ids)
                if isinstance(link, Problem):
                    problems.append(Problem(link.message, filename, lines.get((comfy_id, "inputs", name)),
                                            node_id, ours, link.hint))
                    continue
                inputs[ours] = link
            elif isinstance(value, dict) and set(value) == {"__value__"}:
                inputs[ours] = value["__value__"]  # ComfyUI's wrapping of a list-valued widget
            else:
                inputs[ours] = value
        if strict:
            problems += [Problem(f"required input '{mapping.comfy_name(name)}' is missing (a ComfyUI API "
                                 "workflow lists every input of a node)", filename, source.lines.get(
                                     ("nodes", node_id)), node_id, name,
                                 hint="add it, or write the workflow in sdgraph's YAML, where inputs "
                                      "have defaults")
                         for name in comfy_required(mapping) if name not in inputs]
        nodes[node_id] = NodeDecl(node_id, mapping.ours, inputs)
    if problems:
        raise ValidationFailed(problems)
    source.lines = {k: v for k, v in source.lines.items() if v}
    return Workflow(nodes, {}, source, description, node_aliases=ids, notes=notes)


def comfy_required(mapping: Mapping) -> list[str]:
    """Our names of the inputs ComfyUI requires: all but optional sockets, optional literals (default None)
    and sdgraph's own extra inputs."""
    spec = get_spec(mapping.ours)
    if spec is None:
        return []
    return [name for name, inp in spec.inputs.items()
            if (inp.required or inp.default is not None) and name not in mapping.ours_only]


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _translate_link(value: list, data: dict, ids: dict[str, str]) -> Link | Problem:
    source_id, index = str(value[0]), value[1]
    if source_id not in ids:
        return Problem(f"link to unknown ComfyUI node '{source_id}'", hint=f"nodes: {', '.join(ids)}")
    spec = get_spec(mapping_for(data[source_id]["class_type"]).ours)
    out = spec.output(index) if spec else None
    if out is None:
        return Problem(f"ComfyUI node '{source_id}' has no output {index}")
    return Link(ids[source_id], out.name)


def load_comfy_file(path: Path) -> Workflow:
    data, lines = parse_text(path.read_text(encoding="utf-8"), str(path), "json")
    return workflow_from_comfy(data, str(path), lines,
                               description=f"Converted from the ComfyUI API-format workflow {path.name}")


UI_NODES = re.compile(rb'"nodes"\s*:\s*\[')  # the UI format's node list (ours is an object)


def _sniff_api(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".json" and b'"class_type"' in head and not UI_NODES.search(head)


def _sniff_ui(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".json" and bool(UI_NODES.search(head))


def register() -> None:
    from nodes.comfy_ui_import import load_ui_file

    for comfy, mapping in COMFY_TO_OURS.items():
        if comfy != mapping.ours and not mapping.renames:  # same inputs: the class name is an alias
            alias(comfy, mapping.ours)
    register_importer("comfyui-api", _sniff_api, load_comfy_file)
    register_importer("comfyui-ui", _sniff_ui, load_ui_file)
