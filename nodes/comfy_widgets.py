"""The widgets of a ComfyUI node, in the order its UI saves them (`widgets_values` of a UI-format file).

ComfyUI's frontend makes one widget per literal input, in the node's input order, plus pseudo-widgets
that are saved but never sent to the server: `control_after_generate` ("fixed", "randomize", ...) right
after a `seed`/`noise_seed`, and LoadImage's upload button. sdgraph's node declarations keep ComfyUI's
input order, so the order comes from the registry: a node added later gets its widget order for free.
"""

from __future__ import annotations

from graph.declare import get_spec
from nodes.comfy_table import mapping_for

CONTROL = "control_after_generate"
UPLOAD = "upload"
PSEUDO = frozenset({CONTROL, UPLOAD})
SEED_INPUTS = frozenset({"seed", "noise_seed"})  # the frontend adds the control widget after these
UPLOAD_AFTER = {"LoadImage": "image"}  # the image-upload button follows this widget


def widget_names(comfy_class: str) -> list[str] | None:
    """ComfyUI input names of the class's widgets, pseudo-widgets included; None for an unknown class."""
    mapping = mapping_for(comfy_class)
    spec = get_spec(mapping.ours) if mapping else None
    if spec is None:
        return None
    names: list[str] = []
    for name, inp in spec.inputs.items():
        if inp.is_socket or name in mapping.ours_only:
            continue
        comfy = mapping.comfy_name(name)
        names.append(comfy)
        if comfy in SEED_INPUTS:
            names.append(CONTROL)
        if UPLOAD_AFTER.get(comfy_class) == comfy:
            names.append(UPLOAD)
    return names


def widget_inputs(comfy_class: str, values) -> dict:
    """The API-format inputs a node's saved `widgets_values` (a list, or an object by name) stand for."""
    names = widget_names(comfy_class)
    if names is None or values is None:
        return {}
    if isinstance(values, dict):
        return {k: v for k, v in values.items() if k in names and k not in PSEUDO}
    if not isinstance(values, list):
        raise ValueError(f"widgets_values must be a list or an object, not {type(values).__name__}")
    return {name: value for name, value in zip(names, values, strict=False) if name not in PSEUDO}
