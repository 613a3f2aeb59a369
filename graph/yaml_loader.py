"""PyYAML's safe loader, with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e3` or `1e-4` as strings."""

from __future__ import annotations

import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    pass


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_value(text: str) -> Any:
    """A command-line value (--set/--sweep) as YAML; ValueError (a user message) when it is not YAML."""
    try:
        return load(text) if text.strip() else text
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ValueError(f"cannot read {text!r} as a value ({problem}); quote it or fix it") from e
