"""`GET /object_info`: ComfyUI's description of every node class, derived from sdgraph's declarations
(class names through nodes/comfy_table.py; INT/FLOAT with default/min/max/step; choices as lists; the
file inputs (ckpt_name, lora_name, image, ...) as the lists of files their folders hold now)."""

from __future__ import annotations

from pathlib import Path

from graph.context import Folders
from graph.declare import NODE_REGISTRY, InputSpec, NodeSpec
from graph.types import Boolean, Choice, Float, Int, String
from nodes.comfy_table import OURS_TO_COMFY, mapping_for
from nodes.paths import IMAGE_EXTENSIONS, MODEL_EXTENSIONS, available

# file inputs (declared as strings the node resolves) -> the models sub-folder and extensions they list
MODEL_FOLDERS = {
    "ckpt_name": ("checkpoints", MODEL_EXTENSIONS),
    "lora_name": ("loras", MODEL_EXTENSIONS),
    "vae_name": ("vae", MODEL_EXTENSIONS),
    "config_name": ("configs", (".yaml", ".yml")),
    "model_name": ("upscale_models", MODEL_EXTENSIONS),
    "hypernetwork_name": ("hypernetworks", MODEL_EXTENSIONS),
}
INPUT_FILES = {"image": IMAGE_EXTENSIONS, "latent": (".latent",)}
FOLDER_NAMES = ("checkpoints", "loras", "vae", "configs", "upscale_models", "hypernetworks", "embeddings")


def model_files(folders: Folders, folder: str) -> list[str]:
    exts = {sub: e for sub, e in MODEL_FOLDERS.values()}.get(folder, MODEL_EXTENSIONS)
    return available(Path(folders.models_dir) / folder, exts)


def comfy_classes() -> dict[str, NodeSpec]:
    """ComfyUI class name -> spec, for every registered node (ComfyUI's name where the table has one)."""
    out: dict[str, NodeSpec] = {}
    for name, spec in sorted(NODE_REGISTRY.items()):
        out[OURS_TO_COMFY.get(name, name)] = spec
    return out


def _literal(inp: InputSpec, name: str, spec: NodeSpec, folders: Folders) -> list:
    t, default = inp.type, inp.default
    opts: dict = {} if default is None else {"default": default}
    if name in spec.reads_files and name in MODEL_FOLDERS:
        sub, exts = MODEL_FOLDERS[name]
        return [available(Path(folders.models_dir) / sub, exts), opts]
    if name in spec.reads_files and name in INPUT_FILES:
        names = available(Path(folders.input_dir), INPUT_FILES[name])
        return [names, opts | {"image_upload": name == "image"}]
    if isinstance(t, Choice):
        return [list(t.options), opts]
    if isinstance(t, Int):
        lo, hi = t.min, t.max
        return ["INT", opts | {"min": -(2**63) if lo is None else lo, "max": 2**64 - 1 if hi is None else hi,
                               "step": 1}]
    if isinstance(t, Float):
        lo, hi = t.min, t.max
        return ["FLOAT", opts | {"min": -1e9 if lo is None else lo, "max": 1e9 if hi is None else hi,
                                 "step": 0.01, "round": False}]
    if isinstance(t, Boolean):
        return ["BOOLEAN", opts]
    if isinstance(t, String):
        return ["STRING", opts | {"multiline": t.multiline}]
    return [inp.type_name, opts]


def describe(comfy_class: str, spec: NodeSpec, folders: Folders) -> dict:
    mapping = mapping_for(comfy_class)
    required: dict[str, list] = {}
    optional: dict[str, list] = {}
    for name, inp in spec.inputs.items():
        if mapping and name in mapping.ours_only:
            continue
        entry = [inp.type_name] if inp.is_socket else _literal(inp, name, spec, folders)
        target = required if (inp.required or inp.default is not None) else optional
        target[mapping.comfy_name(name) if mapping else name] = entry
    doc = (spec.description or "").strip()
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": [o.type.name for o in spec.outputs],
        "output_is_list": [False] * len(spec.outputs),
        "output_name": [o.name for o in spec.outputs],
        "name": comfy_class, "display_name": comfy_class,
        "description": " ".join(doc.split("\n\n")[0].split()),
        "python_module": "nodes", "category": spec.category,
        "output_node": spec.is_output, "deprecated": False, "experimental": False,
    }


def object_info(folders: Folders, only: str | None = None) -> dict:
    classes = comfy_classes()
    if only is not None:
        return {only: describe(only, classes[only], folders)} if only in classes else {}
    return {name: describe(name, spec, folders) for name, spec in classes.items()}
