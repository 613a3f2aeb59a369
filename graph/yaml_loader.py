"""PyYAML's safe loader, with YAML 1.2 floats (PyYAML, YAML 1.1, reads `1e3` or `1e-4` as strings), and
bounds checked on the event stream before any data is built: nesting depth, and the size of the document
once aliases are expanded ("billion laughs": a few lines of `&a [*b, *b, ...]` that expand to 10^9 items).
PyYAML's parser is a state machine (no recursion); its composer and constructor recurse per level, so the
depth check must come first. Integers longer than Python's int-string limit become HugeInt, which every
range check refuses with a short message instead of Python's ValueError."""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 100                 # nesting levels of mappings/sequences
MAX_EXPANDED_NODES = 1_000_000  # nodes of the document with every alias expanded
MAX_EXPANDED_CHARS = 64 << 20   # characters of scalars with every alias expanded
MAX_DOCUMENT_CHARS = 64 << 20   # characters of the text itself
MAX_INT_DIGITS = 4000           # below Python's int-string limit (4300 by default)


class HugeInt(int):
    """An integer written with more than MAX_INT_DIGITS digits: stands in (as ±10**MAX_INT_DIGITS, above any
    sane maximum) so that range checks fail with "a 5000-digit integer is above the maximum 10000"."""

    digits: int = 0

    def __new__(cls, negative: bool, digits: int) -> HugeInt:
        value = super().__new__(cls, (-1 if negative else 1) * 10**MAX_INT_DIGITS)
        value.digits = digits
        return value

    def __str__(self) -> str:
        return f"a {self.digits}-digit {'negative ' if self < 0 else ''}integer"

    __repr__ = __str__

    def __reduce__(self):  # copy/deepcopy/pickle
        return HugeInt, (self < 0, self.digits)


def parse_int_text(text: str) -> int:
    """Decimal integer text (as json writes it) to int, or HugeInt when it is too long to convert."""
    digits = len(text.lstrip("+-"))
    if digits > MAX_INT_DIGITS:
        return HugeInt(text.startswith("-"), digits)
    return int(text)


class BoundsExceeded(yaml.YAMLError):
    """A document too deep or too large: carries problem/problem_mark like PyYAML's own errors."""

    def __init__(self, problem: str, mark: Any = None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark

    def __str__(self) -> str:
        return self.problem


class Loader(yaml.SafeLoader):
    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(node.value).replace("_", "")
        if re.fullmatch(r"[-+]?[0-9]+", text) and len(text.lstrip("+-")) > MAX_INT_DIGITS:
            return HugeInt(text.startswith("-"), len(text.lstrip("+-")))
        return super().construct_yaml_int(node)


Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def check_bounds(text: str) -> None:
    """Raise BoundsExceeded (or PyYAML's own syntax error) before anything is composed: one pass over the
    parser's events, linear in the text, keeping for every anchor the size it expands to."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise BoundsExceeded(f"the document has {len(text):,} characters (at most {MAX_DOCUMENT_CHARS:,})")
    anchors: dict[str, tuple[int, int]] = {}
    # one frame per open collection: [anchor, nodes, chars]
    stack: list[list] = [[None, 0, 0]]

    def add(nodes: int, chars: int, mark: Any) -> None:
        top = stack[-1]
        top[1] += nodes
        top[2] += chars
        if stack[0][1] + sum(f[1] for f in stack[1:]) > MAX_EXPANDED_NODES or \
                stack[0][2] + sum(f[2] for f in stack[1:]) > MAX_EXPANDED_CHARS:
            raise BoundsExceeded(
                f"the document expands to more than {MAX_EXPANDED_NODES:,} values or "
                f"{MAX_EXPANDED_CHARS:,} characters once its aliases (*name) are expanded "
                "(a YAML alias bomb?)", mark)

    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_DEPTH:
                raise BoundsExceeded(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            stack.append([event.anchor, 1, 0])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, nodes, chars = stack.pop()
            if anchor is not None:
                anchors[anchor] = (nodes, chars)
            add(nodes, chars, event.start_mark)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchors[event.anchor] = (1, len(event.value))
            add(1, len(event.value), event.start_mark)
        elif isinstance(event, yaml.AliasEvent):
            nodes, chars = anchors.get(event.anchor, (1, 0))
            add(nodes, chars, event.start_mark)


def load(text: str) -> Any:
    check_bounds(text)
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_value(text: str) -> Any:
    """A command-line value (--set/--sweep) as YAML; ValueError (a user message) when it is not YAML."""
    try:
        return load(text) if text.strip() else text
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ValueError(f"cannot read {text!r} as a value ({problem}); quote it or fix it") from e

