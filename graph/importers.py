"""Workflow importers, chosen by sniffing the file. Our YAML/JSON format is built in; other formats
(ComfyUI API JSON, PNG with an embedded workflow) register here:

    from graph.importers import register_importer
    register_importer("comfyui-api", sniff=lambda path, head: ..., load=lambda path: Workflow(...))

`sniff(path, head)` gets the file's first 64 KiB as bytes and answers whether it can load it.
Registered importers are tried before the built-in format, most recent first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graph.errors import Problem, ValidationFailed
from graph.workflow import Workflow, load_workflow_file


@dataclass(frozen=True)
class Importer:
    name: str
    sniff: Callable[[Path, bytes], bool]
    load: Callable[[Path], Workflow]


_IMPORTERS: list[Importer] = []


def register_importer(
    name: str, sniff: Callable[[Path, bytes], bool], load: Callable[[Path], Workflow]
) -> None:
    global _IMPORTERS
    _IMPORTERS = [Importer(name, sniff, load)] + [i for i in _IMPORTERS if i.name != name]


def importers() -> list[Importer]:
    return list(_IMPORTERS)


def load_workflow(path: str | Path) -> Workflow:
    """Load any supported workflow file. Raises ValidationFailed if it cannot be read or parsed."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError as e:
        raise ValidationFailed([Problem(f"cannot read workflow: {e.strerror}", str(path))]) from e
    try:
        for imp in _IMPORTERS:
            if imp.sniff(path, head):
                return imp.load(path)
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            known = ", ".join(i.name for i in _IMPORTERS) or "none registered"
            msg = f"unknown workflow format (expected .yaml/.yml/.json; importers: {known})"
            raise ValidationFailed([Problem(msg, str(path))])
        return load_workflow_file(path)
    except UnicodeDecodeError as e:  # a text format read from a file that is not UTF-8
        raise ValidationFailed([Problem(f"not UTF-8 text (byte {e.start}: {e.reason})", str(path))]) from e
