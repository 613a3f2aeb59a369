"""Errors the graph engine raises on purpose. Each carries enough location (file, line, node, input)
for the CLI to print one actionable line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class GraphError(Exception):
    """Base class of every error graph/ raises on purpose."""


@dataclass
class Problem:
    """One thing wrong with a workflow, located as precisely as we know."""

    message: str
    file: str | None = None
    line: int | None = None
    node: str | None = None
    input: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        subject = ""
        if self.node is not None:
            subject = f"node '{self.node}'"
            if self.input is not None:
                subject += f" input '{self.input}'"
            subject += ": "
        elif self.input is not None:
            subject = f"'{self.input}': "
        text = f"{where}{subject}{self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()} | {"text": str(self)}


class ValidationFailed(GraphError):
    """The workflow cannot run; every problem found is listed (nothing has executed)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class NodeFailed(GraphError):
    """A node raised while executing. The message names the node so the user knows where to look."""

    def __init__(self, node_id: str, node_type: str, cause: BaseException):
        self.node_id, self.node_type, self.cause = node_id, node_type, cause
        super().__init__(f"node '{node_id}' ({node_type}) failed: {type(cause).__name__}: {cause}")


class Cancelled(GraphError):
    """The run was cancelled (Ctrl-C or ExecutionContext.cancel())."""


def did_you_mean(name: object, candidates: Iterable[str]) -> str | None:
    """A 'did you mean ...?' hint naming the closest valid name, or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f"did you mean '{matches[0]}'?" if matches else None
