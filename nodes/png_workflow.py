"""Workflows embedded in images: the PNG text chunks SaveImage writes, and the importers that let
`sdgraph run image.png` re-run them.

Chunks: `sdgraph` holds our workflow exactly as it ran (overrides and the effective seed folded in),
`prompt` the same graph in ComfyUI's API format. Images from elsewhere import too, read in this order:
ComfyUI's `prompt` (what it ran) or `workflow` (its UI graph) chunk, then A1111/Forge/civitai's
`parameters` text -- in a PNG chunk, or for JPEG and WebP in the EXIF UserComment.
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
SDGRAPH_KEY, COMFY_KEY, COMFY_UI_KEY, A1111_KEY = "sdgraph", "prompt", "workflow", "parameters"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


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
    return workflow_from_text(path, read_png_text(path))


def workflow_from_text(path: Path, text: dict[str, str]) -> Workflow:
    # parse_text, not json.loads: bounded nesting and integer sizes, syntax errors as problems
    if SDGRAPH_KEY in text:
        name = f"{path} [sdgraph chunk]"
        return workflow_from_data(parse_text(text[SDGRAPH_KEY], name, "json")[0], SourceMap(name))
    if COMFY_KEY in text:
        from nodes.comfy_import import workflow_from_comfy

        name = f"{path} [prompt chunk]"
        return workflow_from_comfy(parse_text(text[COMFY_KEY], name, "json")[0], name)
    if COMFY_UI_KEY in text:
        from nodes.comfy_ui_import import is_comfy_ui, workflow_from_ui

        name = f"{path} [workflow chunk]"
        data = parse_text(text[COMFY_UI_KEY], name, "json")[0]
        if is_comfy_ui(data):
            return workflow_from_ui(data, name, f"Converted from the ComfyUI workflow in {path.name}")
        from nodes.comfy_import import is_comfy_api, workflow_from_comfy

        if is_comfy_api(data):  # some tools store the API prompt under this key
            return workflow_from_comfy(data, name)
    if A1111_KEY in text:
        from nodes.a1111_import import workflow_from_infotext

        return workflow_from_infotext(text[A1111_KEY], f"{path} [A1111 parameters]")
    raise ValidationFailed([Problem(
        "this image holds no workflow (no 'sdgraph', 'prompt' or 'workflow' chunk, no A1111 'parameters')",
        str(path), hint="only images saved by sdgraph, ComfyUI, A1111/Forge or civitai carry one")])


def decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: an 8-byte charset header, then the text (A1111 writes UNICODE, i.e. UTF-16;
    big-endian per the EXIF standard, but little-endian files exist: the zero bytes tell)."""
    if isinstance(raw, str):
        return raw
    header, body = raw[:8], raw[8:]
    if header == b"UNICODE\x00":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16")
        even, odd = body[0::2].count(0), body[1::2].count(0)
        return body.decode("utf-16-be" if even >= odd else "utf-16-le", errors="replace")
    if header.rstrip(b"\x00") in (b"ASCII", b""):
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    if header.rstrip(b"\x00") == b"JIS":
        return body.decode("shift_jis", errors="replace")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def read_exif_text(path: Path) -> dict[str, str]:
    """A JPEG's or WebP's A1111 `parameters` (EXIF UserComment, or a JPEG comment)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            comment = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
            info = {k: v for k, v in img.info.items() if isinstance(v, str)}
            if comment is None and isinstance(img.info.get("comment"), bytes):
                comment = img.info["comment"].decode("utf-8", errors="replace")
    except OSError as e:
        raise ValidationFailed([Problem(f"cannot read the image: {e}", str(path))]) from e
    if comment:
        info[A1111_KEY] = decode_user_comment(comment)
    return info


def load_exif_workflow(path: Path) -> Workflow:
    return workflow_from_text(path, read_exif_text(path))


def _sniff(path: Path, head: bytes) -> bool:
    return head.startswith(PNG_SIGNATURE)


def _sniff_exif(path: Path, head: bytes) -> bool:
    return head.startswith(b"\xff\xd8\xff") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def register() -> None:
    register_importer("png", _sniff, load_png_workflow)
    register_importer("jpeg-webp", _sniff_exif, load_exif_workflow)
