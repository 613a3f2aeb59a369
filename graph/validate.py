"""Semantic validation of a Workflow against the node registry, before anything runs.

Every problem is collected (not just the first), each located by file:line, node and input, with a
suggested fix where one is obvious. The result on success is the bound graph the planner consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from graph.context import Folders
from graph.declare import NODE_REGISTRY, NodeSpec
from graph.errors import Problem, ValidationFailed, did_you_mean
from graph.workflow import Link, ParamRef, Workflow


@dataclass
class BoundNode:
    """A node with its inputs checked: links as (source node id, output index), literals normalized
    (defaults filled in), and the files it reads resolved."""

    id: str
    spec: NodeSpec
    links: dict[str, tuple[str, int]]
    literals: dict[str, Any]
    files: dict[str, Path | list[Path]]


def validate(wf: Workflow, folders: Folders | None = None) -> dict[str, BoundNode]:
    """Check everything; raise ValidationFailed listing all problems. With `folders`, files named by
    `reads_files` inputs are resolved too (a missing model is reported here, before any node runs)."""
    problems: list[Problem] = []
    bound: dict[str, BoundNode] = {}
    src = wf.source

    def problem(msg: str, node: str | None = None, inp: str | None = None, hint: str | None = None):
        line = src.node_line(node, inp) if node else None
        problems.append(Problem(msg, src.file, line, node, inp, hint))

    for node_id, decl in wf.nodes.items():
        spec = NODE_REGISTRY.get(decl.type)
        if spec is None:
            problem(f"unknown node type '{decl.type}'", node_id,
                    hint=did_you_mean(decl.type, NODE_REGISTRY) or "see `sdgraph nodes`")
            continue
        links: dict[str, tuple[str, int]] = {}
        literals: dict[str, Any] = {}
        for name, value in decl.inputs.items():
            inp = spec.inputs.get(name)
            if inp is None:
                listed = ", ".join(spec.inputs) or "none"
                hint = did_you_mean(name, spec.inputs) or f"inputs of {spec.type_name}: {listed}"
                problem(f"unknown input '{name}' for {spec.type_name}", node_id, name, hint)
                continue
            if isinstance(value, Link):
                target = wf.nodes.get(value.node)
                if target is None:
                    problem(f"link to unknown node '{value.node}'", node_id, name,
                            did_you_mean(value.node, wf.nodes))
                    continue
                target_spec = NODE_REGISTRY.get(target.type)
                if target_spec is None:
                    continue  # already reported as an unknown type
                out = target_spec.output(value.output)
                if out is None:
                    names = ", ".join(o.name for o in target_spec.outputs) or "none"
                    hint = did_you_mean(value.output, [o.name for o in target_spec.outputs])
                    problem(f"node '{value.node}' ({target.type}) has no output '{value.output}'",
                            node_id, name, hint or f"its outputs: {names}")
                    continue
                if not inp.accepts_link_from(out.type):
                    problem(f"expects {inp.type_name} but '{value.node}.{out.name}' is {out.type.name}",
                            node_id, name, _link_hint(wf, inp.type_name))
                    continue
                links[name] = (value.node, out.index)
                continue
            if isinstance(value, ParamRef):
                if value.name not in wf.params:
                    problem(f"unknown param '${value.name}'", node_id, name,
                            did_you_mean(value.name, wf.params) or "define it under params:")
                    continue
                value = wf.params[value.name]
            if inp.is_socket:
                hint = _link_hint(wf, inp.type_name) or f"write {{from: NODE.{inp.type_name}}}"
                problem(f"expects a link from a {inp.type_name} output, got the literal {value!r}",
                        node_id, name, hint)
                continue
            try:
                literals[name] = inp.type.check(value)
            except ValueError as e:
                problem(str(e), node_id, name)
        for name, inp in spec.inputs.items():
            if name in decl.inputs:
                continue
            if inp.required:
                problem(f"missing required input '{name}' ({inp.type_name})", node_id, name,
                        hint=f"add '{name}: ...'")
            elif not inp.is_socket:
                literals[name] = inp.default
        bound[node_id] = BoundNode(node_id, spec, links, literals, {})

    if folders is not None:
        for b in bound.values():
            for name, resolver in b.spec.reads_files.items():
                if name in b.literals:
                    try:
                        resolved = resolver(b.literals[name], folders)
                        # a resolver may name several files (a model and its config, a prompt's files),
                        # or none (a prompt without embeddings: its key stays what it was)
                        if isinstance(resolved, (list, tuple)):
                            if resolved:
                                b.files[name] = [Path(p) for p in resolved]
                        else:
                            b.files[name] = Path(resolved)
                    except (OSError, ValueError) as e:
                        problem(_message(e), b.id, name)
            for name, checker in b.spec.writes_files.items():
                if name in b.literals:
                    try:
                        checker(b.literals[name], folders)
                    except (OSError, ValueError) as e:
                        problem(_message(e), b.id, name)

    graph = nx.DiGraph()
    graph.add_nodes_from(bound)
    graph.add_edges_from((src_id, b.id) for b in bound.values() for src_id, _ in b.links.values())
    try:
        cycle = nx.find_cycle(graph)
        path = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        problem(f"cycle: {path}", cycle[0][1], hint="a node cannot depend on its own output")
    except nx.NetworkXNoCycle:
        pass
    if not any(b.spec.is_output for b in bound.values()) and not problems:
        sinks = sorted(s.type_name for s in NODE_REGISTRY.values() if s.is_output)
        problems.append(Problem("no output node: nothing would be produced", src.file, src.line("nodes"),
                                hint=f"add one of: {', '.join(sinks)}" if sinks else None))
    if problems:
        raise ValidationFailed(problems)
    return bound


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"cannot use {e.filename}: {e.strerror}"
    return str(e.args[0]) if e.args else str(e)


def _link_hint(wf: Workflow, type_name: str) -> str | None:
    """Point at a node in this workflow that does produce the wanted type."""
    for node_id, decl in wf.nodes.items():
        spec = NODE_REGISTRY.get(decl.type)
        if spec:
            for out in spec.outputs:
                if out.type.name == type_name:
                    return f"e.g. {{from: {node_id}.{out.name}}}"
    return None
