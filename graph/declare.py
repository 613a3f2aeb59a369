"""`@node`: declare a node as a typed function, and the registry of declared nodes.

Everything else (validation, the JSON schema of inputs, `sdgraph nodes` text, cache keys) is derived
from the one declaration:

    @node(category="math", outputs=("INT",))
    def Add(a: Int(0, 100), b: Int(0, 100) = 1) -> int:
        "Add two integers."
        return a + b

See docs/CONTRACTS.md, section "graph <-> nodes", for the full rules.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph.types import PYTHON_LITERALS, SOCKET_TYPES, LiteralType, SocketType, socket_type

CACHE_TIERS = ("disk", "memory", "never")

FileResolver = Callable[[str, Any], "Path | list[Path]"]
"""reads_files resolver: (literal value, Folders) -> the path of the file the node will read, or a list of
paths when the value names several (each is fingerprinted, in order). Raise FileNotFoundError with a
helpful message (e.g. listing what is available) when one is missing."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: SocketType | LiteralType
    required: bool
    default: Any = None

    @property
    def is_socket(self) -> bool:
        return isinstance(self.type, SocketType)

    @property
    def type_name(self) -> str:
        return self.type.name if isinstance(self.type, SocketType) else self.type.type_name

    def accepts_link_from(self, socket: SocketType) -> bool:
        """Sockets need the same type; literals accept a link from the matching primitive type."""
        return socket.name == self.type_name


@dataclass(frozen=True)
class OutputSpec:
    name: str
    type: SocketType
    index: int


@dataclass
class NodeSpec:
    """The derived description of one node type. Built by @node; read by the engine and the CLI."""

    type_name: str
    fn: Callable[..., Any]
    category: str
    description: str
    inputs: dict[str, InputSpec]
    outputs: tuple[OutputSpec, ...]
    version: int = 1
    is_output: bool = False
    cache: str = "auto"
    volatile: bool = False
    reads_files: dict[str, FileResolver] = field(default_factory=dict)
    wants_ctx: bool = False
    writes_files: dict[str, FileResolver] = field(default_factory=dict)

    @property
    def cache_tier(self) -> str:
        """"disk", "memory" or "never"; "auto" becomes "disk" once every output type has a serializer
        (checked at run time, so serializers may be registered after the node is declared)."""
        if self.cache != "auto":
            return self.cache
        # A sink without outputs is "disk" too: its entry records the files it wrote.
        return "disk" if all(o.type.serializable for o in self.outputs) else "memory"

    @property
    def title(self) -> str:
        """The docstring's first sentence (its first paragraph may wrap over several lines)."""
        paragraph = " ".join(self.description.strip().split("\n\n")[0].split())
        sentence = re.match(r"(.+?\.)(?:\s|$)", paragraph)
        return sentence.group(1) if sentence else paragraph

    def output(self, ref: str | int) -> OutputSpec | None:
        """The output named `ref` or at index `ref` (an int, or a string of digits)."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            i = int(ref)
            return self.outputs[i] if 0 <= i < len(self.outputs) else None
        return next((o for o in self.outputs if o.name == ref), None)

    def input_schema(self) -> dict:
        """JSON schema of this node's entry in a workflow (type plus inputs)."""
        link = {"$ref": "#/$defs/link"}
        param = {"$ref": "#/$defs/param_ref"}
        props: dict[str, Any] = {"type": {"const": self.type_name}}
        for spec in self.inputs.values():
            if spec.is_socket:
                props[spec.name] = link
            else:
                props[spec.name] = {"anyOf": [spec.type.json_schema() or {}, link, param]}
                if spec.default is not None:
                    props[spec.name]["default"] = spec.default
        return {
            "type": "object",
            "description": self.title,
            "properties": props,
            "required": ["type"] + [s.name for s in self.inputs.values() if s.required],
            "additionalProperties": False,
        }


NODE_REGISTRY: dict[str, NodeSpec] = {}
NODE_ALIASES: dict[str, str] = {}  # another name for a registered type (e.g. ComfyUI's class name)


def alias(other_name: str, type_name: str) -> None:
    """Let workflow files name the node type `type_name` as `other_name` too (same inputs, outputs)."""
    if other_name in NODE_REGISTRY and other_name != type_name:
        raise ValueError(f"{other_name!r} is a node type itself; it cannot be an alias of {type_name!r}")
    NODE_ALIASES[other_name] = type_name


def canonical_type(name: str) -> str:
    """The registered type a workflow's `type:` means (an alias resolves to its type)."""
    return name if name in NODE_REGISTRY else NODE_ALIASES.get(name, name)


def node(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    category: str = "misc",
    outputs: Sequence[str | SocketType] | None = None,
    output_names: Sequence[str] | None = None,
    version: int = 1,
    output: bool = False,
    cache: str | None = None,
    volatile: bool = False,
    reads_files: dict[str, FileResolver] | None = None,
    writes_files: dict[str, FileResolver] | None = None,
):
    """Declare a node type from a typed function and register it.

    outputs:      socket type names of the returned values (a tuple return for several); when left
                  out they come from the return annotation (a SocketType, or none).
    output_names: names used in links (`{from: ckpt.CLIP}`); default: the type names.
    version:      bump when the node's behaviour changes, to invalidate cached results.
    output:       a sink (e.g. SaveImage): always planned, writes files through ctx.
    cache:        "disk" (memory + persistent store; needs serializers for all outputs),
                  "memory" (in-process only), "never" (recomputed whenever needed).
                  Default: "disk" when every output type has a serializer, else "memory".
    volatile:     the result may differ between runs with equal inputs (never a cache hit).
    reads_files:  {input name: resolver} for inputs naming files whose content the result depends on.
    writes_files: {input name: checker} for inputs naming where the node writes (a sink's prefix): the
                  checker gets (value, Folders), returns the folder it will write in and raises
                  ValueError when it cannot (validation reports it before anything runs).
    """

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        spec = _build_spec(f, name, category, outputs, output_names, version, output, cache, volatile,
                           reads_files or {}, writes_files or {})
        existing = NODE_REGISTRY.get(spec.type_name)
        if existing is not None and existing.fn.__qualname__ != f.__qualname__:
            raise ValueError(f"node type {spec.type_name!r} is declared twice "
                             f"({existing.fn.__module__} and {f.__module__})")
        NODE_REGISTRY[spec.type_name] = spec
        f.node_spec = spec  # type: ignore[attr-defined]
        return f

    return wrap(fn) if fn is not None else wrap


def get_spec(type_name: str) -> NodeSpec | None:
    return NODE_REGISTRY.get(canonical_type(type_name))


def _build_spec(f, name, category, outputs, output_names, version, output, cache, volatile, reads_files,
                writes_files):
    type_name = name or f.__name__
    sig = inspect.signature(f, eval_str=True)
    inputs: dict[str, InputSpec] = {}
    wants_ctx = False
    for p in sig.parameters.values():
        if p.name == "ctx":
            wants_ctx = True
            continue
        if p.name == "type":  # `type:` is the node's type in a workflow file
            raise TypeError(f"{type_name}: an input cannot be named 'type'")
        kind = _input_type(type_name, p.name, p.annotation)
        has_default = p.default is not inspect.Parameter.empty
        default = p.default if has_default else None
        if has_default and default is not None and isinstance(kind, LiteralType):
            kind.check(default)  # a bad default is the node author's bug: fail at import
        inputs[p.name] = InputSpec(p.name, kind, required=not has_default, default=default)
    for what, names in (("reads_files", reads_files), ("writes_files", writes_files)):
        for key in names:
            if key not in inputs or inputs[key].is_socket:
                raise TypeError(f"{type_name}: {what} names {key!r}, which is not a literal input")

    out_types = _output_types(type_name, outputs, sig.return_annotation)
    names = list(output_names) if output_names else _default_output_names(out_types)
    if len(names) != len(out_types) or len(set(names)) != len(names):
        raise TypeError(f"{type_name}: output_names must be {len(out_types)} distinct names")
    out_specs = tuple(OutputSpec(n, t, i) for i, (n, t) in enumerate(zip(names, out_types, strict=True)))

    cache = cache or "auto"
    if cache not in CACHE_TIERS + ("auto",):
        raise ValueError(f"{type_name}: cache must be one of {CACHE_TIERS}, not {cache!r}")
    return NodeSpec(type_name, f, category, inspect.getdoc(f) or "", inputs, out_specs, version,
                    output, cache, volatile, dict(reads_files), wants_ctx, dict(writes_files))


def _default_output_names(types: list[SocketType]) -> list[str]:
    """The type names; a repeated type gets its index appended (FLOAT, FLOAT_1)."""
    names = []
    for i, t in enumerate(types):
        names.append(t.name if t.name not in names else f"{t.name}_{i}")
    return names


def _input_type(type_name: str, param: str, annotation: Any) -> SocketType | LiteralType:
    if isinstance(annotation, (SocketType, LiteralType)):
        return annotation
    if annotation in PYTHON_LITERALS:
        return PYTHON_LITERALS[annotation]()
    raise TypeError(f"{type_name}: parameter {param!r} needs a socket or literal annotation "
                    f"(e.g. LATENT, Int(0, 10), Choice([...])), not {annotation!r}")


def _output_types(type_name, outputs, annotation) -> list[SocketType]:
    if outputs is not None:
        declared = [outputs] if isinstance(outputs, (str, SocketType)) else list(outputs)
    elif isinstance(annotation, SocketType):
        declared = [annotation]
    elif typing.get_origin(annotation) is tuple:
        declared = list(typing.get_args(annotation))
    else:
        declared = []
    result = []
    for t in declared:
        if isinstance(t, str):
            if t not in SOCKET_TYPES:
                raise TypeError(f"{type_name}: unknown output type {t!r}; register it with socket_type()")
            t = socket_type(t)
        if not isinstance(t, SocketType):
            raise TypeError(f"{type_name}: output type must be a socket type name, not {t!r}")
        result.append(t)
    return result
