"""Import ComfyUI UI-format workflows (what the editor saves, and the `workflow` chunk of its PNGs).

The litegraph JSON is turned into the API prompt ComfyUI's frontend would send (`graphToPrompt` in
ComfyUI_frontend's src/utils/executionUtil.ts and litegraph's ExecutableNodeDTO), then imported like an
API file, so both formats share one translation:

- `widgets_values` (positional, or an object by name) become inputs by the node's widget order
  (nodes/comfy_widgets.py); a linked input (a widget converted to a socket) takes its link instead.
- Links come from the `links` table: `[id, origin, origin_slot, target, target_slot, type]` or objects.
- Virtual nodes: `Reroute` passes its input on, `PrimitiveNode` gives its value to the widgets it feeds,
  `Note`/`MarkdownNote` and groups are left out.
- Mode 2 (muted): left out, and inputs linked to it are dropped. Mode 4 (bypassed): each output passes on
  the input of the same type (the same slot first), as ComfyUI does.
- Subgraphs (`definitions.subgraphs`, current frontend): an instance's type is the subgraph's id; inner
  nodes get ids `instance:inner`, links through the subgraph's input (-10) and output (-20) nodes are
  followed out of and into it, and an unlinked instance input that is a widget gives its value.
- Group nodes (`extra.groupNodes`, the frontend's older grouping): an instance `workflow>Name` is expanded
  into its inner nodes `instance:index`, its inputs, outputs and widgets mapped onto them by the frontend's
  rules (groupNode.ts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph.errors import Problem, ValidationFailed
from graph.source_text import parse_text
from graph.workflow import Workflow
from nodes.comfy_import import workflow_from_comfy
from nodes.comfy_widgets import CONTROL, widget_inputs, widget_names

MUTED, BYPASSED = 2, 4
SUBGRAPH_IN, SUBGRAPH_OUT = -10, -20
COMMENTS = frozenset({"Note", "MarkdownNote"})
GROUP_PREFIXES = ("workflow>", "workflow/")


class UIFormatError(ValueError):
    """A UI file that cannot be followed (a dangling link, a cycle of reroutes, a missing definition)."""


def is_comfy_ui(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


@dataclass(frozen=True)
class _Value:
    value: Any


@dataclass(frozen=True)
class _Out:
    exec_id: str
    slot: int


@dataclass
class _Graph:
    """One graph level: the root workflow, or a subgraph as seen from one instance of it."""

    nodes: dict[str, dict]
    links: dict[Any, tuple]            # link id -> (origin id, origin slot, target id, target slot)
    path: tuple[str, ...] = ()         # ids of the subgraph instances above this level
    instance: tuple[dict, _Graph] | None = None
    outputs: list[dict] = field(default_factory=list)  # the subgraph's outputs (their linkIds)
    promoted: dict[int, Any] = field(default_factory=dict)  # instance input index -> its widget's value
    proxied: dict[tuple[str, str], Any] = field(default_factory=dict)  # (inner id, widget) -> value

    def exec_id(self, node_id: Any) -> str:
        return ":".join((*self.path, str(node_id)))


class _Converter:
    def __init__(self, data: dict):
        definitions = (data.get("definitions") or {}).get("subgraphs") or []
        self.subgraphs = {sg["id"]: sg for sg in definitions
                          if isinstance(sg, dict) and isinstance(sg.get("id"), str)}
        self.groups = (data.get("extra") or {}).get("groupNodes") or {}
        self.notes: list[str] = []
        self.prompt: dict[str, dict] = {}
        self.children: dict[tuple, _Graph] = {}

    # -- building graph levels -------------------------------------------------------------------
    def graph(self, nodes: list, links: list, path=(), instance=None, outputs=None) -> _Graph:
        g = _Graph({}, {_link_id(entry): _link_ends(entry) for entry in links or [] if entry is not None},
                   path, instance, outputs or [])  # saved files may hold null entries for deleted links
        for node in nodes:
            if not isinstance(node, dict) or "id" not in node:
                raise UIFormatError("every entry of 'nodes' needs an 'id'")
            g.nodes[str(node["id"])] = node
        for node in list(g.nodes.values()):
            if _group_name(node.get("type")) is not None and node.get("mode") != BYPASSED:
                self.expand_group(g, node)
        return g

    def child(self, g: _Graph, node: dict) -> _Graph:
        key = (g.path, str(node["id"]))
        if key not in self.children:
            sg = self.subgraphs[node["type"]]
            if len(g.path) > 32:
                raise UIFormatError(f"subgraph {node['type']} contains itself")
            child = self.graph(sg.get("nodes") or [], sg.get("links") or [], (*g.path, str(node["id"])),
                               (node, g), sg.get("outputs") or [])
            child.promoted, child.proxied = _promoted_values(node, _widget_slots(child))
            self.children[key] = child
        return self.children[key]

    # -- the prompt --------------------------------------------------------------------------------
    def collect(self, g: _Graph) -> None:
        for node in g.nodes.values():
            kind, mode = node.get("type"), node.get("mode", 0)
            if kind in self.subgraphs:
                if mode not in (MUTED, BYPASSED):
                    self.collect(self.child(g, node))
                continue
            if kind in COMMENTS or kind in ("Reroute", "PrimitiveNode") or mode in (MUTED, BYPASSED):
                continue
            self.emit(g, node)

    def emit(self, g: _Graph, node: dict) -> None:
        kind = node.get("type")
        if not isinstance(kind, str):
            raise UIFormatError(f"node {node['id']} has no type")
        inputs = widget_inputs(kind, node.get("widgets_values"))
        inputs |= {name: v for (inner, name), v in g.proxied.items() if inner == str(node["id"])}
        for slot, inp in enumerate(node.get("inputs") or []):
            resolved = self.resolve_input(g, node, slot, set())
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if resolved is None:
                continue
            link = [resolved.exec_id, resolved.slot] if isinstance(resolved, _Out) else None
            inputs[name] = resolved.value if isinstance(resolved, _Value) else link
        self.prompt[g.exec_id(node["id"])] = {"class_type": kind, "inputs": inputs,
                                              "_meta": {"title": node.get("title") or kind}}

    def resolve_input(self, g: _Graph, node: dict, slot: int, visited: set, want: Any = None):
        inputs = node.get("inputs") or []
        if not 0 <= slot < len(inputs):
            raise UIFormatError(f"node {g.exec_id(node['id'])} has no input {slot}")
        link_id = inputs[slot].get("link")
        if link_id is None:
            return None
        if link_id not in g.links:
            raise UIFormatError(f"node {g.exec_id(node['id'])} input '{inputs[slot].get('name')}': link "
                                f"{link_id} is not in the links table")
        origin, origin_slot = g.links[link_id][:2]
        if g.instance is not None and origin == SUBGRAPH_IN:  # out of the subgraph, into its instance
            instance, parent = g.instance
            outer = instance.get("inputs") or []  # may be left out: the frontend rebuilds them
            if origin_slot >= len(outer) or outer[origin_slot].get("link") is None:
                return _Value(g.promoted[origin_slot]) if origin_slot in g.promoted else None
            return self.resolve_input(parent, instance, origin_slot, visited)
        source = g.nodes.get(str(origin))
        if source is None:
            raise UIFormatError(f"link {link_id} comes from node {origin}, which is not in the workflow")
        return self.resolve_output(g, source, origin_slot, want or inputs[slot].get("type"), visited)

    def resolve_output(self, g: _Graph, node: dict, slot: int, want: Any, visited: set):
        key = (g.path, str(node["id"]), slot)
        if key in visited:
            raise UIFormatError(f"node {g.exec_id(node['id'])}: links go round in a circle")
        visited.add(key)
        kind = node.get("type")
        if node.get("mode") == BYPASSED:
            index = _bypass_input(node, slot, want)
            return None if index < 0 else self.resolve_input(g, node, index, visited)
        if kind in self.subgraphs:
            child = self.child(g, node)
            outs = child.outputs
            link_ids = (outs[slot].get("linkIds") or []) if 0 <= slot < len(outs) else []
            link = next((child.links[i] for i in link_ids if i in child.links), None) or next(
                (e for e in child.links.values() if e[2] == SUBGRAPH_OUT and e[3] == slot), None)
            if link is None:
                return None
            inner = child.nodes.get(str(link[0]))
            if inner is None:
                raise UIFormatError(f"subgraph {kind}: output {slot} comes from a missing node {link[0]}")
            return self.resolve_output(child, inner, link[1], want, visited)
        if kind == "PrimitiveNode":  # its value was applied to the widgets it feeds
            values = node.get("widgets_values") or []
            return _Value(values[0]) if values else None
        if kind == "Reroute":
            return self.resolve_input(g, node, 0, visited, want) if node.get("inputs") else None
        if kind in COMMENTS:
            return None
        return _Out(g.exec_id(node["id"]), slot)

    # -- group nodes (legacy) ------------------------------------------------------------------------
    def expand_group(self, g: _Graph, instance: dict) -> None:
        name = _group_name(instance["type"])
        definition = self.groups.get(name)
        if definition is None:
            raise UIFormatError(f"node {instance['id']} is the group node {name!r}, which extra.groupNodes "
                                "does not define")
        gid = str(instance["id"])
        inner = [copy.deepcopy(n) for n in definition.get("nodes") or []]
        ids = [f"{gid}:{i}" for i in range(len(inner))]
        for i, node in enumerate(inner):
            node["id"] = ids[i]
            if instance.get("mode") == MUTED:
                node["mode"] = MUTED
            for inp in node.get("inputs") or []:
                inp["link"] = None
        linked_to: set[tuple[int, int]] = set()
        linked_from: set[tuple[int, int]] = set()
        for n, entry in enumerate(definition.get("links") or []):
            source, source_slot, target, target_slot = entry[:4]
            if source is None:
                continue
            link_id = f"{gid}:link{n}"
            g.links[link_id] = (ids[source], source_slot, ids[target], target_slot)
            inner[target]["inputs"][target_slot]["link"] = link_id
            linked_to.add((target, target_slot))
            linked_from.add((source, source_slot))
        external = {(e[0], e[1]) for e in definition.get("external") or []}

        # group inputs: unlinked sockets node by node, then unlinked converted widgets
        sockets, widgets = [], []
        for i, node in enumerate(inner):
            for s, inp in enumerate(node.get("inputs") or []):
                if (i, s) not in linked_to:
                    (widgets if inp.get("widget") else sockets).append((i, s))
        for k, inp in enumerate(instance.get("inputs") or []):
            if k < len(sockets + widgets) and inp.get("link") is not None:
                i, s = (sockets + widgets)[k]
                inner[i]["inputs"][s]["link"] = inp["link"]
        # group outputs: each inner output not used inside the group (or also used outside it)
        outputs = [(i, o) for i, node in enumerate(inner) for o in range(len(node.get("outputs") or []))
                   if (i, o) not in linked_from or (i, o) in external]
        for link_id, (origin, origin_slot, *rest) in list(g.links.items()):
            if str(origin) == gid and 0 <= origin_slot < len(outputs):
                i, o = outputs[origin_slot]
                g.links[link_id] = (ids[i], o, *rest)
        self.apply_group_widgets(instance, inner)
        del g.nodes[gid]
        g.nodes.update({node["id"]: node for node in inner})

    def apply_group_widgets(self, instance: dict, inner: list[dict]) -> None:
        values = instance.get("widgets_values")
        if not isinstance(values, list) or not values:
            return
        slots: list[tuple[dict, str | int]] = []
        for node in inner:
            kind = node.get("type")
            converted = {(inp.get("widget") or {}).get("name") for inp in node.get("inputs") or []}
            if kind == "PrimitiveNode":
                linked = any(out.get("links") for out in node.get("outputs") or [])
                names = ["value", CONTROL] if linked else []  # an unlinked primitive has no widgets
            else:
                names = widget_names(kind) or []
            slots += [(node, name) for name in names if name not in converted]
        if len(slots) != len(values):
            self.notes.append(f"group node {instance['id']}: {len(values)} widget values for {len(slots)} "
                              "widgets; kept the values stored inside the group")
            return
        for (node, name), value in zip(slots, values, strict=True):
            if node.get("type") == "PrimitiveNode":
                if name == "value":
                    node["widgets_values"] = [value]
                continue
            current = node.get("widgets_values")
            if isinstance(current, list):
                by_name = dict(zip(widget_names(node["type"]) or [], current, strict=False))
            else:
                by_name = dict(current or {})
            by_name[name] = value
            node["widgets_values"] = by_name


def _group_name(kind: Any) -> str | None:
    if isinstance(kind, str):
        for prefix in GROUP_PREFIXES:
            if kind.startswith(prefix):
                return kind[len(prefix):]
    return None


def _link_id(entry: Any) -> Any:
    return entry["id"] if isinstance(entry, dict) else entry[0]


def _link_ends(entry: Any) -> tuple:
    if isinstance(entry, dict):
        return (entry["origin_id"], entry["origin_slot"], entry.get("target_id"), entry.get("target_slot"))
    if not isinstance(entry, list) or len(entry) < 5:
        raise UIFormatError(f"a link must be [id, origin, origin_slot, target, target_slot, type], not "
                            f"{entry!r}")
    return tuple(entry[1:5])


def _widget_slots(child: _Graph) -> list[int]:
    """The subgraph inputs that feed a widget of an inner node: the instance shows a widget for each."""
    slots = set()
    for origin, origin_slot, target, target_slot in child.links.values():
        node = child.nodes.get(str(target))
        inputs = (node or {}).get("inputs") or []
        if origin == SUBGRAPH_IN and isinstance(target_slot, int) and 0 <= target_slot < len(inputs) \
                and inputs[target_slot].get("widget"):
            slots.add(origin_slot)
    return sorted(slots)


def _promoted_values(instance: dict, widget_slots: list[int]) -> tuple[dict[int, Any], dict[tuple, Any]]:
    """A subgraph instance's widget values: by subgraph input (one widget per input that feeds an inner
    widget, in input order), and by inner widget when `properties.proxyWidgets` lists [inner node id,
    widget name] per value ("-1": the instance's own input of that name)."""
    values = instance.get("widgets_values")
    inputs = instance.get("inputs") or []
    slots = widget_slots or [i for i, inp in enumerate(inputs) if inp.get("widget")]
    proxies = (instance.get("properties") or {}).get("proxyWidgets")
    if isinstance(proxies, list) and isinstance(values, list):
        by_input: dict[int, Any] = {}
        by_widget: dict[tuple[str, str], Any] = {}
        for entry, value in zip(proxies, values, strict=False):
            if not (isinstance(entry, list) and len(entry) >= 2):
                continue
            target, name = str(entry[0]), str(entry[1])
            if target == "-1":
                index = next((i for i in slots if i < len(inputs) and name in (
                    (inputs[i].get("widget") or {}).get("name"), inputs[i].get("name"))), None)
                if index is not None:
                    by_input[index] = value
            else:
                by_widget[(target, name)] = value
        return by_input, by_widget
    if isinstance(values, dict):
        names = {i: (inputs[i].get("widget") or {}).get("name") for i in slots if i < len(inputs)}
        return {i: values[n] for i, n in names.items() if n in values}, {}
    return dict(zip(slots, values or [], strict=False)), {}  # fewer values: the rest keep inner values


def _valid(a: Any, b: Any) -> bool:
    """litegraph's isValidConnection: equal types, a wildcard, or overlapping comma lists."""
    a, b = str(a or "*").upper(), str(b or "*").upper()
    if a in ("*", "0") or b in ("*", "0") or a == b:
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def _bypass_input(node: dict, slot: int, want: Any) -> int:
    """The input a bypassed node passes to output `slot` (ExecutableNodeDTO's rule): the same slot if
    its type fits, else the first input of exactly the wanted type, else the first that fits."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if 0 <= slot < len(outputs) else "*"
    if want in ("*", "", None):
        return slot if len(inputs) > slot else (0 if inputs else -1)
    same = inputs[slot].get("type") if slot < len(inputs) else None
    if same is not None and _valid(same, out_type) and _valid(same, want):
        return slot
    for i, inp in enumerate(inputs):
        if inp.get("type") == want:
            return i
    return next((i for i, inp in enumerate(inputs)
                 if _valid(inp.get("type"), out_type) and _valid(inp.get("type"), want)), -1)


def prompt_from_ui(data: dict) -> tuple[dict[str, dict], list[str]]:
    """The API prompt ComfyUI would queue for this UI graph, and notes on what was changed."""
    converter = _Converter(data)
    converter.collect(converter.graph(data["nodes"], data.get("links") or []))
    prompt = converter.prompt
    for body in prompt.values():  # ComfyUI drops inputs linked to nodes it left out (muted ones)
        body["inputs"] = {k: v for k, v in body["inputs"].items()
                          if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                  and isinstance(v[1], int) and v[0] not in prompt)}
    return prompt, converter.notes


def workflow_from_ui(data: dict, filename: str | None = None, description: str | None = None) -> Workflow:
    try:
        prompt, notes = prompt_from_ui(data)
    except (UIFormatError, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        message = str(e) if isinstance(e, UIFormatError) else f"{type(e).__name__}: {e}"
        problem = Problem(f"cannot follow this ComfyUI UI workflow: {message}", filename)
        raise ValidationFailed([problem]) from e
    if not prompt:
        raise ValidationFailed([Problem("this ComfyUI UI workflow has no node to run (all muted, bypassed "
                                        "or notes)", filename)])
    return workflow_from_comfy(prompt, filename, description=description, strict=False, notes=notes)


def load_ui_file(path: Path) -> Workflow:
    data, _ = parse_text(path.read_text(encoding="utf-8"), str(path), "json")
    if not is_comfy_ui(data):
        raise ValidationFailed([Problem("not a ComfyUI UI workflow: expected 'nodes' and 'links'",
                                        str(path), 1)])
    return workflow_from_ui(data, str(path), f"Converted from the ComfyUI UI workflow {path.name}")
