"""Planning: keep only nodes that reach an output, order them topologically, compute cache keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from graph.cache_keys import node_key
from graph.fingerprint import FingerprintIndex
from graph.validate import BoundNode


@dataclass
class PlannedNode:
    node: BoundNode
    key: str

    @property
    def id(self) -> str:
        return self.node.id


@dataclass
class Plan:
    order: list[str]          # needed nodes, topological (ties broken by order in the file)
    nodes: dict[str, PlannedNode]
    outputs: list[str]        # output (sink) nodes
    unreachable: list[str]    # declared but not needed by any output
    types: dict[str, str]     # node id -> node type, for every declared node


def make_plan(bound: dict[str, BoundNode], fingerprints: FingerprintIndex | None = None) -> Plan:
    fingerprints = fingerprints or FingerprintIndex()
    position = {node_id: i for i, node_id in enumerate(bound)}
    graph = nx.DiGraph()
    graph.add_nodes_from(bound)
    graph.add_edges_from((src, b.id) for b in bound.values() for src, _ in b.links.values())
    outputs = [n for n in bound if bound[n].spec.is_output]
    needed = set(outputs).union(*(nx.ancestors(graph, o) for o in outputs))
    order = list(nx.lexicographical_topological_sort(graph.subgraph(needed), key=position.__getitem__))

    planned: dict[str, PlannedNode] = {}
    for node_id in order:
        b = bound[node_id]
        upstream = {name: (planned[src].key, index) for name, (src, index) in b.links.items()}
        files = {name: fingerprints.fingerprint(path) if isinstance(path, Path)
                 else [fingerprints.fingerprint(p) for p in path] for name, path in b.files.items()}
        key = node_key(b.spec.type_name, b.spec.version, b.literals, upstream, files, b.spec.volatile)
        planned[node_id] = PlannedNode(b, key)
    unreachable = [n for n in bound if n not in needed]
    return Plan(order, planned, outputs, unreachable, {n: b.spec.type_name for n, b in bound.items()})
