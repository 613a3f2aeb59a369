"""Write a workflow in ComfyUI's API format (for the `prompt` text chunk of saved PNGs): every input
explicit (params substituted, defaults filled in), links as ["id", output index]."""

from __future__ import annotations

from typing import Any

from graph.declare import get_spec
from graph.workflow import Link, ParamRef, Workflow
from nodes.comfy_table import COMFY_TO_OURS, OURS_TO_COMFY


def to_comfy_api(wf: Workflow) -> dict[str, dict]:
    """Node ids stay ours; a node type ComfyUI lacks keeps its sdgraph name as class_type."""
    result: dict[str, dict] = {}
    for node_id, decl in wf.nodes.items():
        spec = get_spec(decl.type)
        comfy_class = OURS_TO_COMFY.get(decl.type, decl.type)
        mapping = COMFY_TO_OURS.get(comfy_class)
        inputs: dict[str, Any] = {}
        if spec is not None:
            for name, inp in spec.inputs.items():
                if name not in decl.inputs and not inp.is_socket and inp.default is not None:
                    inputs[name] = inp.default
        for name, value in decl.inputs.items():
            inputs[name] = _value(wf, value)
        if mapping is not None and spec is not None:  # keep the export loadable by ComfyUI
            for name in mapping.ours_only:
                if name in inputs and inputs[name] == spec.inputs[name].default:
                    del inputs[name]
        if mapping is not None:
            inputs = {mapping.comfy_name(k): v for k, v in inputs.items()}
        result[node_id] = {"class_type": comfy_class, "inputs": inputs, "_meta": {"title": node_id}}
    return result


def _value(wf: Workflow, value: Any) -> Any:
    if isinstance(value, ParamRef):
        return wf.params.get(value.name)
    if isinstance(value, Link):
        source = wf.nodes.get(value.node)
        spec = get_spec(source.type) if source else None
        out = spec.output(value.output) if spec else None
        return [value.node, out.index if out else value.output]
    return value
