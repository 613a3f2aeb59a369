"""ComfyUI's filename_prefix tokens, expanded when a save node runs.

In ComfyUI two layers expand them: the frontend (before it queues a prompt; `applyTextReplacements`)
replaces `%date:FORMAT%` and `%NodeName.input%`, and the server (`folder_paths.get_save_image_path`)
replaces `%width%`, `%height%`, `%year%`, `%month%`, `%day%`, `%hour%`, `%minute%`, `%second%`. An API
file holds them raw, so sdgraph expands all of them here, at run time:

- `%date:yyyy-MM-dd%`: the frontend's format letters: yyyy, yy, MM/M, dd/d, hh/h (24-hour), mm/m, ss/s;
  other text is kept (local time, as the browser's).
- `%Node.input%`: `Node` is a node id of the workflow, else a node type (sdgraph's or ComfyUI's class
  name, e.g. `KSampler`, `CheckpointLoaderSimple`; the first such node), as ComfyUI matches a node's
  "Node name for S&R" (which defaults to its class name) or title. The value is the input's literal
  (params substituted, the default when left out), with `/` and `\\` made `_` as ComfyUI does. An input fed
  by a link, or a node that is not there, leaves the token as written, as ComfyUI does.

The caller checks the expanded prefix like any other (nodes/images.py output_location): a token cannot
lead a file out of the output folder.

The save node's cache key holds the prefix as written, not as expanded: an identical re-run (same inputs
upstream) is a cache hit while the files it wrote exist, whatever today's date; in ComfyUI the frontend
would have sent another prompt. A `%Node.input%` of a node upstream of the save changes its key anyway.
"""

from __future__ import annotations

import re
import time
from typing import Any

_TOKEN = re.compile(r"%([^%]+)%")
_DATE_PART = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


def format_date(fmt: str, now: time.struct_time) -> str:
    """The ComfyUI frontend's formatDate: each run of format letters replaced, zero-padded to its length."""
    parts = {"d": now.tm_mday, "M": now.tm_mon, "h": now.tm_hour, "m": now.tm_min, "s": now.tm_sec}

    def one(m: re.Match) -> str:
        text = m.group(0)
        if text == "yy":
            return str(now.tm_year)[2:]
        if text == "yyyy":
            return str(now.tm_year)
        if text[0] in parts:
            return str(parts[text[0]]).zfill(len(text))
        return text

    return _DATE_PART.sub(one, fmt)


def _node_value(workflow: dict, node_name: str, input_name: str) -> str | None:
    from graph.declare import canonical_type, get_spec

    nodes = workflow.get("nodes") or {}
    body = nodes.get(node_name)
    if body is None:
        wanted = canonical_type(node_name)
        body = next((b for b in nodes.values()
                     if isinstance(b, dict) and canonical_type(str(b.get("type"))) == wanted), None)
    if not isinstance(body, dict):
        return None
    if input_name in body:
        value: Any = body[input_name]
    else:
        spec = get_spec(str(body.get("type")))
        inp = spec.inputs.get(input_name) if spec else None
        if inp is None or inp.is_socket or inp.default is None:
            return None
        value = inp.default
    if isinstance(value, dict):
        return None  # a link: no widget value to show
    if isinstance(value, str) and value.startswith("$"):
        if value.startswith("$$"):
            value = value[1:]
        else:
            params = workflow.get("params") or {}
            if value[1:] not in params:
                return None
            value = params[value[1:]]
    if isinstance(value, bool):
        value = str(value).lower()  # as JavaScript prints a widget's boolean
    return re.sub(r"[/\\]", "_", str(value))


def expand_prefix(prefix: str, workflow: dict | None, width: int | None = None, height: int | None = None,
                  now: time.struct_time | None = None) -> str:
    """`prefix` with ComfyUI's tokens replaced (see the module docstring); unknown tokens stay."""
    if "%" not in prefix:
        return prefix
    now = now or time.localtime()
    workflow = workflow or {}

    def frontend(m: re.Match) -> str:
        text = m.group(1)
        split = text.split(".")
        if len(split) != 2:
            return format_date(split[0][5:], now) if split[0].startswith("date:") else m.group(0)
        value = _node_value(workflow, split[0], split[1])
        return m.group(0) if value is None else value

    out = _TOKEN.sub(frontend, prefix)
    server = {"year": str(now.tm_year), "month": f"{now.tm_mon:02}", "day": f"{now.tm_mday:02}",
              "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}", "second": f"{now.tm_sec:02}"}
    if width is not None and height is not None:
        server |= {"width": str(width), "height": str(height)}
    for name, value in server.items():
        out = out.replace(f"%{name}%", value)
    return out
