"""Import ComfyUI API-format workflows (`Save (API Format)`): {"id": {"class_type", "inputs"}} with
links written ["id", output index]. Registered with graph.importers, so `sdgraph run/convert/validate`
accept such files. Classes without an sdgraph equivalent are listed together in one error.
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
from nodes.comfy_table import COMFY_TO_OURS


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
                        description: str | None = None) -> Workflow:
    """Translate API-format data; raise ValidationFailed (one problem per unsupported class type)."""
    lines = lines or {}
    if isinstance(data.get("prompt"), dict) and is_comfy_api(data["prompt"]):
        data = data["prompt"]  # the body sent to ComfyUI's /prompt endpoint
        lines = {k[1:]: v for k, v in lines.items() if k and k[0] == "prompt"}
    if not is_comfy_api(data):
        raise ValidationFailed([Problem("not a ComfyUI API-format workflow: expected an object of "
                                        '{"id": {"class_type": ..., "inputs": {...}}}', filename, 1)])
    unsupported: dict[str, list[str]] = {}
    for comfy_id, body in data.items():
        if body["class_type"] not in COMFY_TO_OURS:
            unsupported.setdefault(body["class_type"], []).append(str(comfy_id))
    if unsupported:
        listed = "; ".join(f"{cls} (node {', '.join(ids)})" for cls, ids in sorted(unsupported.items()))
        supported = ", ".join(sorted(COMFY_TO_OURS))
        first = next(iter(unsupported.values()))[0]
        raise ValidationFailed([Problem(
            f"{len(unsupported)} ComfyUI node type(s) have no sdgraph equivalent: {listed}",
            filename, lines.get((first,)), hint=f"supported: {supported}")])

    taken: set[str] = set()
    ids = {str(cid): _node_id(cid, COMFY_TO_OURS[body["class_type"]].slug, taken)
           for cid, body in data.items()}
    nodes: dict[str, NodeDecl] = {}
    source = SourceMap(filename)
    problems: list[Problem] = []
    for comfy_id, body in data.items():
        mapping = COMFY_TO_OURS[body["class_type"]]
        node_id = ids[str(comfy_id)]
        source.lines[("nodes", node_id)] = lines.get((comfy_id,)) or lines.get((comfy_id, "class_type"))
        inputs: dict[str, Any] = {}
        for name, value in (body.get("inputs") or {}).items():
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
            else:
                inputs[ours] = value
        nodes[node_id] = NodeDecl(node_id, mapping.ours, inputs)
    if problems:
        raise ValidationFailed(problems)
    source.lines = {k: v for k, v in source.lines.items() if v}
    return Workflow(nodes, {}, source, description, node_aliases=ids)


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _translate_link(value: list, data: dict, ids: dict[str, str]) -> Link | Problem:
    source_id, index = str(value[0]), value[1]
    if source_id not in ids:
        return Problem(f"link to unknown ComfyUI node '{source_id}'", hint=f"nodes: {', '.join(ids)}")
    spec = get_spec(COMFY_TO_OURS[data[source_id]["class_type"]].ours)
    out = spec.output(index) if spec else None
    if out is None:
        return Problem(f"ComfyUI node '{source_id}' has no output {index}")
    return Link(ids[source_id], out.name)


def load_comfy_file(path: Path) -> Workflow:
    data, lines = parse_text(path.read_text(encoding="utf-8"), str(path), "json")
    return workflow_from_comfy(data, str(path), lines,
                               description=f"Converted from the ComfyUI API-format workflow {path.name}")


def _sniff_api(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".json" and b'"class_type"' in head


def _sniff_ui(path: Path, head: bytes) -> bool:
    return (path.suffix.lower() == ".json" and b'"class_type"' not in head
            and b'"last_node_id"' in head and b'"links"' in head)


def _refuse_ui(path: Path) -> Workflow:
    raise ValidationFailed([Problem(
        "this is a ComfyUI UI workflow (the editor's format), which sdgraph cannot run", str(path), 1,
        hint="in ComfyUI use Workflow > Export (API) / 'Save (API Format)' and run that file")])


def register() -> None:
    for comfy, mapping in COMFY_TO_OURS.items():
        if comfy != mapping.ours and not mapping.renames:  # same inputs: the class name is an alias
            alias(comfy, mapping.ours)
    register_importer("comfyui-ui", _sniff_ui, _refuse_ui)
    register_importer("comfyui-api", _sniff_api, load_comfy_file)
