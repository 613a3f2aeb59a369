"""A ComfyUI API prompt (the body of `POST /prompt`) turned into a validated sdgraph run, or refused in
ComfyUI's error shape: `{"error": {...}, "node_errors": {id: {"errors": [...], "class_type", ...}}}`,
keyed by the *submitted* node ids (the importer renames "3" to "sampler_3"; the Job keeps both ways)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graph.context import Folders
from graph.declare import get_spec
from graph.errors import Problem, ValidationFailed
from graph.runner import PreparedVariation, prepare
from nodes.comfy_import import workflow_from_comfy
from nodes.comfy_table import mapping_for

MAX_NODES = 2000          # a prompt larger than any real workflow is refused before it is read further
MAX_ID_LENGTH = 128


class PromptRejected(Exception):
    """The prompt cannot run; `body` is ComfyUI's answer (sent with HTTP 400)."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(body["error"]["message"])


@dataclass
class Job:
    """One queued prompt: what ComfyUI's queue item holds plus the validated run."""

    number: int
    prompt_id: str
    prompt: dict                     # as submitted
    extra_data: dict
    outputs: list[str]               # submitted ids of the output nodes
    prepared: PreparedVariation
    to_comfy: dict[str, str]         # our node id -> submitted id
    classes: dict[str, str] = field(default_factory=dict)  # submitted id -> class_type

    @property
    def client_id(self) -> str | None:
        cid = self.extra_data.get("client_id")
        return cid if isinstance(cid, str) else None

    def entry(self) -> list:
        """ComfyUI's 5-element queue/history tuple: number, prompt_id, prompt, extra_data, outputs."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


def _error(kind: str, message: str, details: str = "", node_errors: dict | None = None) -> PromptRejected:
    return PromptRejected({"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                           "node_errors": node_errors or {}})


def check_shape(prompt: Any) -> dict[str, dict]:
    """The structure ComfyUI expects, checked before anything else reads it."""
    if not isinstance(prompt, dict) or not prompt:
        raise _error("no_prompt", "No prompt provided",
                     "the body needs {\"prompt\": {id: {class_type, inputs}}}")
    if len(prompt) > MAX_NODES:
        raise _error("invalid_prompt", f"Prompt has {len(prompt)} nodes; at most {MAX_NODES} are accepted")
    node_errors: dict[str, dict] = {}
    for node_id, body in prompt.items():
        if len(node_id) > MAX_ID_LENGTH:
            raise _error("invalid_prompt", f"a node id is longer than {MAX_ID_LENGTH} characters")
        cls = body.get("class_type") if isinstance(body, dict) else None
        if not isinstance(cls, str):
            node_errors[node_id] = _node_error("invalid_prompt", "node has no class_type", None, None)
        elif not isinstance(body.get("inputs", {}), dict):
            node_errors[node_id] = _node_error("invalid_input_type", "'inputs' must be an object", None, cls)
        elif mapping_for(cls) is None:
            node_errors[node_id] = _node_error(
                "invalid_prompt", f"Cannot execute because node {cls} does not exist.", None, cls)
    if node_errors:
        first = next(iter(node_errors))
        raise _error("invalid_prompt", node_errors[first]["errors"][0]["message"], f"Node ID '#{first}'",
                     node_errors)
    return prompt


def _node_error(kind: str, message: str, input_name: str | None, cls: str | None, details: str = "") -> dict:
    extra = {"input_name": input_name} if input_name else {}
    error = {"type": kind, "message": message, "details": details or message, "extra_info": extra}
    return {"errors": [error],
            "dependent_outputs": [], "class_type": cls}


def prepare_prompt(prompt: Any, folders: Folders, number: int, prompt_id: str, extra_data: dict) -> Job:
    """Validate the prompt as `sdgraph run` validates a file; raise PromptRejected in ComfyUI's shape."""
    prompt = check_shape(prompt)
    classes = {cid: body["class_type"] for cid, body in prompt.items()}
    to_comfy: dict[str, str] = {}
    try:
        wf = workflow_from_comfy(prompt, "prompt")
        to_comfy = {ours: cid for cid, ours in wf.node_aliases.items()}
        outputs = [to_comfy.get(n, n) for n, decl in wf.nodes.items()
                   if (spec := get_spec(decl.type)) is not None and spec.is_output]
        if not outputs:
            raise _error("prompt_no_outputs", "Prompt has no outputs",
                         "add an output node such as SaveImage or PreviewImage")
        prepared = prepare(wf, [], [], folders)[0]
    except ValidationFailed as e:
        raise _rejected(e.problems, to_comfy or {f"{_slug(c)}_{cid}": cid for cid, c in classes.items()},
                        classes) from e
    return Job(number, prompt_id, prompt, extra_data, outputs, prepared, to_comfy, classes)


def _slug(cls: str) -> str:
    mapping = mapping_for(cls)
    return mapping.slug if mapping else ""


def _rejected(problems: list[Problem], to_comfy: dict[str, str], classes: dict[str, str]) -> PromptRejected:
    """Problems located at a node become that node's errors, under its submitted id and ComfyUI's input
    name; the rest go into the top-level details."""
    node_errors: dict[str, dict] = {}
    loose: list[str] = []
    for p in problems:
        cid = to_comfy.get(p.node) if p.node is not None else None
        if cid is None and p.node in classes:
            cid = p.node
        if cid is None:
            loose.append(str(p))
            continue
        cls = classes.get(cid)
        mapping = mapping_for(cls) if cls else None
        input_name = mapping.comfy_name(p.input) if (mapping and p.input) else p.input
        text = p.message + (f" ({p.hint})" if p.hint else "")
        entry = node_errors.setdefault(cid, {"errors": [], "dependent_outputs": [], "class_type": cls})
        entry["errors"] += _node_error("value_not_valid", text, input_name, cls, str(p))["errors"]
    return _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                  "\n".join(loose), node_errors)
