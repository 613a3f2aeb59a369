"""Parse YAML or JSON text into plain data plus a map from each key path to its line number.

PyYAML and json silently keep the last of duplicate keys; here a duplicate is an error with its line.
"""

from __future__ import annotations

import bisect
import json
from typing import Any

import yaml

from graph import yaml_loader
from graph.errors import Problem, ValidationFailed

Lines = dict[tuple, int]


def parse_text(text: str, filename: str, fmt: str) -> tuple[Any, Lines]:
    """fmt: "yaml" or "json". Raises ValidationFailed for syntax errors and duplicate keys."""
    return _parse_json(text, filename) if fmt == "json" else _parse_yaml(text, filename)


# --- YAML -------------------------------------------------------------------------------------------

def _parse_yaml(text: str, filename: str) -> tuple[Any, Lines]:
    try:
        yaml_loader.check_bounds(text)  # before composing: the composer recurses per level
        root = yaml.compose(text, Loader=yaml_loader.Loader)
        data = yaml.load(text, Loader=yaml_loader.Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        msg = str(e) if isinstance(e, yaml_loader.BoundsExceeded) else \
            f"YAML syntax error: {getattr(e, 'problem', None) or e}"
        raise ValidationFailed([Problem(msg, filename, line)]) from e
    lines: Lines = {}
    problems: list[Problem] = []
    if root is not None:
        _walk_yaml(root, (), lines, problems, filename)
    if problems:
        raise ValidationFailed(problems)
    return data, lines


def _walk_yaml(node: yaml.Node, path: tuple, lines: Lines, problems: list[Problem], filename: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(_duplicate(path, key, filename, line, seen[key]))
                continue
            seen[key] = line
            lines[path + (key,)] = line
            _walk_yaml(value_node, path + (key,), lines, problems, filename)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_yaml(item, path + (i,), lines, problems, filename)


def _duplicate(path: tuple, key: str, filename: str, line: int, first: int | None) -> Problem:
    what = "node id" if path == ("nodes",) else "key"
    first_text = f" (first defined on line {first})" if first else ""
    return Problem(f"duplicate {what} '{key}'{first_text}", filename, line, *_node_and_input(path + (key,)),
                   hint="rename or remove one of them")


def _node_and_input(path: tuple) -> tuple[str | None, str | None]:
    if len(path) >= 2 and path[0] == "nodes":
        return str(path[1]), (str(path[2]) if len(path) >= 3 else None)
    return None, None


# --- JSON -------------------------------------------------------------------------------------------

_scalar_decoder = json.JSONDecoder(parse_int=yaml_loader.parse_int_text)


class _JsonSyntax(Exception):
    def __init__(self, msg: str, pos: int):
        super().__init__(msg)
        self.pos = pos


def _parse_json(text: str, filename: str) -> tuple[Any, Lines]:
    """A small recursive parser (objects and arrays here, scalars by the json module) that records
    the line of every key and detects duplicates. Nesting is bounded (yaml_loader.MAX_DEPTH), so its
    recursion, and every later walk over the data, stays shallow."""
    if len(text) > yaml_loader.MAX_DOCUMENT_CHARS:
        msg = f"the document has {len(text):,} characters (at most {yaml_loader.MAX_DOCUMENT_CHARS:,})"
        raise ValidationFailed([Problem(msg, filename)])
    lines: Lines = {}
    problems: list[Problem] = []

    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def value(pos: int, path: tuple) -> tuple[Any, int]:
        pos = skip(pos)
        if pos >= len(text):
            raise _JsonSyntax("unexpected end of file", pos)
        ch = text[pos]
        if ch in "{[" and len(path) >= yaml_loader.MAX_DEPTH:
            raise _JsonSyntax(f"nested deeper than {yaml_loader.MAX_DEPTH} levels", pos)
        if ch == "{":
            result: dict = {}
            pos = skip(pos + 1)
            if text.startswith("}", pos):
                return result, pos + 1
            while True:
                pos = skip(pos)
                if not text.startswith('"', pos):
                    raise _JsonSyntax("expected a quoted key", pos)
                key, end = _scalar_decoder.raw_decode(text, pos)
                if key in result:
                    problems.append(_duplicate(path, key, filename, line_of(pos), lines.get(path + (key,))))
                lines.setdefault(path + (key,), line_of(pos))
                pos = skip(end)
                if not text.startswith(":", pos):
                    raise _JsonSyntax("expected ':'", pos)
                item, pos = value(pos + 1, path + (key,))
                result.setdefault(key, item)
                pos = skip(pos)
                if text.startswith(",", pos):
                    pos += 1
                elif text.startswith("}", pos):
                    return result, pos + 1
                else:
                    raise _JsonSyntax("expected ',' or '}'", pos)
        if ch == "[":
            items: list = []
            pos = skip(pos + 1)
            if text.startswith("]", pos):
                return items, pos + 1
            while True:
                lines[path + (len(items),)] = line_of(skip(pos))
                item, pos = value(pos, path + (len(items),))
                items.append(item)
                pos = skip(pos)
                if text.startswith(",", pos):
                    pos += 1
                elif text.startswith("]", pos):
                    return items, pos + 1
                else:
                    raise _JsonSyntax("expected ',' or ']'", pos)
        try:
            return _scalar_decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _JsonSyntax(e.msg, e.pos) from e

    try:
        data, end = value(0, ())
        if skip(end) != len(text):
            raise _JsonSyntax("extra data after the document", skip(end))
    except _JsonSyntax as e:
        raise ValidationFailed([Problem(f"JSON syntax error: {e}", filename, line_of(e.pos))]) from e
    if problems:
        raise ValidationFailed(problems)
    return data, lines
