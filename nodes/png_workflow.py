"""Workflows embedded in PNG files: the text chunks SaveImage writes, and the importer that lets
`sdgraph run image.png` re-run them.

Chunks: `sdgraph` holds our workflow exactly as it ran (overrides and the effective seed folded in),
`prompt` the same graph in ComfyUI's API format. A PNG from ComfyUI (only `prompt`) imports too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graph.errors import Problem, ValidationFailed
from graph.importers import register_importer
from graph.source_text import parse_text
from graph.workflow import SourceMap, Workflow, workflow_from_data

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SDGRAPH_KEY, COMFY_KEY = "sdgraph", "prompt"


_LAST: list = [None, None]  # (run_info, text) of the last call: every SaveImage of a run shares one


def png_text(run_info: dict[str, Any]) -> dict[str, str]:
    """The text chunks for an image made by a run (`run_info` from the engine). Made once per run: a
    workflow of 5,000 SaveImage nodes must not re-check and re-export itself 5,000 times."""
    if _LAST[0] is run_info:
        return dict(_LAST[1])
    text = _png_text(run_info)
    _LAST[:] = [run_info, text]
    return dict(text)


def _png_text(run_info: dict[str, Any]) -> dict[str, str]:
    data = run_info.get("workflow")
    if not data:
        return {}
    from nodes.comfy_export import to_comfy_api

    # only the effective workflow: re-running the image then writes byte-identical metadata
    text = {SDGRAPH_KEY: json.dumps(data, sort_keys=False)}
    try:
        text[COMFY_KEY] = json.dumps(to_comfy_api(workflow_from_data(data)))
    except ValidationFailed:
        pass  # an unusual workflow still gets its own chunk
    return text


def read_png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return {k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)}
    except OSError as e:
        raise ValidationFailed([Problem(f"cannot read the PNG: {e}", str(path))]) from e


def load_png_workflow(path: Path) -> Workflow:
    text = read_png_text(path)
    # parse_text, not json.loads: bounded nesting and integer sizes, syntax errors as problems
    if SDGRAPH_KEY in text:
        name = f"{path} [sdgraph chunk]"
        return workflow_from_data(parse_text(text[SDGRAPH_KEY], name, "json")[0], SourceMap(name))
    if COMFY_KEY in text:
        from nodes.comfy_import import workflow_from_comfy

        name = f"{path} [prompt chunk]"
        return workflow_from_comfy(parse_text(text[COMFY_KEY], name, "json")[0], name)
    raise ValidationFailed([Problem("this PNG holds no workflow (no 'sdgraph' or 'prompt' text chunk)",
                                    str(path), hint="only images saved by sdgraph or ComfyUI carry one")])


def _sniff(path: Path, head: bytes) -> bool:
    return head.startswith(PNG_SIGNATURE)


def register() -> None:
    register_importer("png", _sniff, load_png_workflow)
