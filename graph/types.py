"""Socket types (values that travel along links) and literal types (constants with constraints).

A node parameter annotated with a SocketType is an input *socket*: it must be linked to another node's
output of the same type. A parameter annotated with a LiteralType (Int, Float, String, Boolean, Choice)
is a constant written in the workflow; it may also be linked to an output of the matching primitive
socket type (INT, FLOAT, STRING, BOOLEAN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from graph import yaml_loader


class SocketType:
    """A named kind of value (MODEL, LATENT, ...). Registered once by name; hooks may be added later.

    to_bytes/from_bytes: a serializer that lets the disk cache keep values of this type.
    nbytes: the size of a value in bytes, for the memory cache's budget (default: value.nbytes).
    """

    def __init__(self, name: str):
        self.name = name
        self.to_bytes: Callable[[Any], bytes] | None = None
        self.from_bytes: Callable[[bytes], Any] | None = None
        self.nbytes: Callable[[Any], int] | None = None

    @property
    def serializable(self) -> bool:
        return self.to_bytes is not None and self.from_bytes is not None

    def __repr__(self) -> str:
        return f"SocketType({self.name!r})"


SOCKET_TYPES: dict[str, SocketType] = {}


def socket_type(
    name: str,
    *,
    to_bytes: Callable[[Any], bytes] | None = None,
    from_bytes: Callable[[bytes], Any] | None = None,
    nbytes: Callable[[Any], int] | None = None,
) -> SocketType:
    """Register (or fetch) the socket type `name`, attaching any hooks given."""
    st = SOCKET_TYPES.setdefault(name, SocketType(name))
    if (to_bytes is None) != (from_bytes is None):
        raise ValueError(f"socket type {name}: give both to_bytes and from_bytes, or neither")
    if to_bytes is not None:
        st.to_bytes, st.from_bytes = to_bytes, from_bytes
    if nbytes is not None:
        st.nbytes = nbytes
    return st


MODEL = Model = socket_type("MODEL")
CLIP = Clip = socket_type("CLIP")
VAE = Vae = socket_type("VAE")
CONDITIONING = Conditioning = socket_type("CONDITIONING")
LATENT = Latent = socket_type("LATENT")
IMAGE = Image = socket_type("IMAGE")
MASK = Mask = socket_type("MASK")


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


# Primitives are JSON on disk, so nodes producing them are disk-cached without any set-up.
INT = socket_type("INT", to_bytes=_json_bytes, from_bytes=json.loads)
FLOAT = socket_type("FLOAT", to_bytes=_json_bytes, from_bytes=json.loads)
STRING = socket_type("STRING", to_bytes=_json_bytes, from_bytes=json.loads)
BOOLEAN = socket_type("BOOLEAN", to_bytes=_json_bytes, from_bytes=json.loads)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class LiteralType:
    """A constant input. `check` returns the normalized value or raises ValueError with a user message."""

    type_name = "ANY"

    def check(self, value: Any) -> Any:
        return value

    def parse(self, text: str) -> Any:
        """Parse a command-line string (--set/--sweep) into a value, then check it."""
        return self.check(yaml_loader.load_value(text))

    def describe(self) -> str:
        return self.type_name

    def json_schema(self) -> dict:
        return {}


class Int(LiteralType):
    type_name = "INT"

    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected an integer, got {type(value).__name__} {_fmt(value)}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected an integer, got {value}")
            value = int(value)
        if isinstance(value, yaml_loader.HugeInt):  # too long to convert: out of any range
            lo, hi = self.min, self.max
            bound = (f"the minimum {lo}" if value < 0 else f"the maximum {hi}") if (lo if value < 0 else hi) \
                is not None else "what an integer input takes"
            raise ValueError(f"{value} is {'below' if value < 0 else 'above'} {bound}")
        return _check_range(value, self.min, self.max)

    def describe(self) -> str:
        return f"INT{_range_text(self.min, self.max)}"

    def json_schema(self) -> dict:
        return _range_schema({"type": "integer"}, self.min, self.max)


class Float(LiteralType):
    type_name = "FLOAT"

    def __init__(self, min: float | None = None, max: float | None = None):
        self.min, self.max = min, max

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {type(value).__name__} {_fmt(value)}")
        if isinstance(value, yaml_loader.HugeInt):
            raise ValueError(f"{value} is out of range")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return _check_range(float(value), self.min, self.max)

    def describe(self) -> str:
        return f"FLOAT{_range_text(self.min, self.max)}"

    def json_schema(self) -> dict:
        return _range_schema({"type": "number"}, self.min, self.max)


class String(LiteralType):
    type_name = "STRING"

    def __init__(self, multiline: bool = False):
        self.multiline = multiline

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__} {_fmt(value)}")
        return value

    def parse(self, text: str) -> str:
        return text  # a prompt on the command line is taken verbatim, never YAML-interpreted

    def json_schema(self) -> dict:
        return {"type": "string"}


class Boolean(LiteralType):
    type_name = "BOOLEAN"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_fmt(value)}")
        return value

    def json_schema(self) -> dict:
        return {"type": "boolean"}


class Choice(LiteralType):
    """One of a fixed list of strings (sampler names, scheduler names, ...)."""

    type_name = "STRING"

    def __init__(self, options: Sequence[str]):
        self.options = tuple(options)

    def check(self, value: Any) -> str:
        if value not in self.options:
            from graph.errors import did_you_mean

            hint = did_you_mean(value, self.options)
            listed = ", ".join(self.options[:12]) + (", ..." if len(self.options) > 12 else "")
            raise ValueError(f"{_fmt(value)} is not one of: {listed}" + (f"; {hint}" if hint else ""))
        return value

    def parse(self, text: str) -> str:
        return self.check(text)

    def describe(self) -> str:
        return "CHOICE"

    def json_schema(self) -> dict:
        return {"enum": list(self.options)}


def _check_range(value, lo, hi):
    if lo is not None and value < lo:
        raise ValueError(f"{value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{value} is above the maximum {hi}")
    return value


def _range_text(lo, hi) -> str:
    if lo is None and hi is None:
        return ""
    return f" [{'' if lo is None else lo}, {'' if hi is None else hi}]"


def _range_schema(schema: dict, lo, hi) -> dict:
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return schema


PYTHON_LITERALS: dict[type, Callable[[], LiteralType]] = {int: Int, float: Float, str: String, bool: Boolean}
"""Plain annotations (`steps: int = 20`) mean an unconstrained literal of that kind."""
