"""Estimate the memory a workflow needs before running it, and refuse one that cannot fit.

graph/ knows nothing of what a node computes, so node modules register an estimator per node type:

    register_estimate("EmptyLatent", lambda literals, inputs, files: Estimate(held=..., outputs=(info,)))

`literals` are the node's checked literal inputs, `inputs` the `outputs` infos of the estimates of the nodes
linked to it (by input name; None where unknown), `files` its resolved files. `held` is the bytes of its
outputs (the executor keeps every value of a run until the run ends), `working` what it needs on top of
its inputs and outputs while it runs. Walking the plan in order, the need at a node is what is held by then
plus its working memory; a need above what this process can have (physical memory, or a lower address-
space limit) is a ValidationFailed naming the node and both figures. Estimates are lower bounds: a run
refused here could not have finished; one let through may still be tight.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from graph.errors import Problem, ValidationFailed


@dataclass(frozen=True)
class Estimate:
    held: int = 0
    working: int = 0
    outputs: tuple = ()     # one info per output, passed to the estimators of linked nodes
    detail: str = ""        # what the figure is made of, for the message


Estimator = Callable[[dict[str, Any], dict[str, Any], dict[str, Path]], Estimate]
_ESTIMATORS: dict[str, Estimator] = {}


def register_estimate(type_name: str, estimator: Estimator) -> None:
    _ESTIMATORS[type_name] = estimator


def available_memory() -> int:
    """Bytes this process can have: physical memory, or the address-space/data limit where lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 1 << 62
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            total = min(total, soft)
    return total


def human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def check_memory(bound: dict, source=None, available: int | None = None) -> None:
    """Raise ValidationFailed when a node of the plan of `bound` (validate()'s result) would need more
    memory than `available` (default: available_memory())."""
    available = available_memory() if available is None else available
    graph = nx.DiGraph()
    graph.add_nodes_from(bound)
    graph.add_edges_from((src, b.id) for b in bound.values() for src, _ in b.links.values())
    outputs = [n for n in bound if bound[n].spec.is_output]
    needed = set(outputs).union(*(nx.ancestors(graph, o) for o in outputs))
    infos: dict[str, tuple] = {}
    held = 0
    for node_id in nx.topological_sort(graph.subgraph(needed)):
        b = bound[node_id]
        estimator = _ESTIMATORS.get(b.spec.type_name)
        if estimator is None:
            continue
        inputs = {name: _info(infos, src, index) for name, (src, index) in b.links.items()}
        try:
            est = estimator(b.literals, inputs, b.files)
        except (OSError, ValueError) as e:  # e.g. an image whose header cannot be read
            line = source.node_line(node_id) if source else None
            raise ValidationFailed([Problem(str(e), getattr(source, "file", None), line, node_id)]) from e
        infos[node_id] = est.outputs
        need = held + est.working + est.held
        if need > available:
            line = source.node_line(node_id) if source else None
            detail = f" ({est.detail})" if est.detail else ""
            before = f", with {human(held)} held by the nodes before it" if held else ""
            msg = (f"{b.spec.type_name} needs at least {human(need)} of memory{detail}{before}; "
                   f"this machine has {human(available)}")
            raise ValidationFailed([Problem(msg, getattr(source, "file", None), line, node_id,
                                            hint="use a smaller width/height, batch_size or image")])
        held += est.held


def _info(infos: dict[str, tuple], src: str, index: int) -> Any:
    outs = infos.get(src)
    return outs[index] if outs is not None and index < len(outs) else None
