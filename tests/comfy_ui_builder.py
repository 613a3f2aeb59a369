"""Build ComfyUI UI-format (litegraph) workflows by hand for tests, in the layout ComfyUI's frontend saves:
nodes with `inputs` (`link` ids), `outputs` (`links` lists), positional `widgets_values`, and a `links`
table of [id, origin, origin_slot, target, target_slot, type] (or objects, schema version 1)."""

from __future__ import annotations

from typing import Any


class UIGraph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.extra: dict = {}
        self.definitions: list[dict] = []

    def add(
        self,
        node_id: int | str,
        kind: str,
        inputs=(),
        outputs=(),
        widgets: Any = None,
        mode: int = 0,
        **extra,
    ) -> dict:
        """inputs: (name, type) or (name, type, widget_name) for a widget converted to an input."""
        node = {
            "id": node_id,
            "type": kind,
            "pos": [10 * len(self.nodes), 20],
            "size": [300, 100],
            "flags": {},
            "order": len(self.nodes),
            "mode": mode,
            "properties": {"Node name for S&R": kind},
            "inputs": [],
            "outputs": [],
        }
        for entry in inputs:
            name, typ = entry[0], entry[1]
            slot = {"name": name, "type": typ, "link": None}
            if len(entry) > 2:
                slot["widget"] = {"name": entry[2]}
            node["inputs"].append(slot)
        for i, typ in enumerate(outputs):
            node["outputs"].append({"name": typ, "type": typ, "links": [], "slot_index": i})
        if widgets is not None:
            node["widgets_values"] = widgets
        node.update(extra)
        self.nodes.append(node)
        return node

    def node(self, node_id) -> dict:
        return next(n for n in self.nodes if n["id"] == node_id)

    def link(self, source, slot: int, target, input_name: str) -> int:
        link_id = max((e[0] for e in self.links), default=0) + 1
        src, dst = self.node(source), self.node(target)
        index = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name)
        typ = src["outputs"][slot]["type"] if src["outputs"] else "*"
        dst["inputs"][index]["link"] = link_id
        if src["outputs"]:
            src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, source, slot, target, index, typ])
        return link_id

    def data(self, object_links: bool = False) -> dict:
        data: dict[str, Any] = {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "groups": [],
            "config": {},
            "extra": self.extra,
            "version": 0.4,
        }
        if object_links:
            data.pop("last_node_id"), data.pop("last_link_id")
            data["version"] = 1
            data["state"] = {"lastNodeId": len(self.nodes), "lastLinkId": len(self.links)}
            data["links"] = [
                dict(
                    zip(
                        ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), e, strict=True
                    )
                )
                for e in self.links
            ]
        else:
            data["links"] = self.links
        if self.definitions:
            data["definitions"] = {"subgraphs": self.definitions}
        return data


KSAMPLER_IN = [
    ("model", "MODEL"),
    ("positive", "CONDITIONING"),
    ("negative", "CONDITIONING"),
    ("latent_image", "LATENT"),
]


def txt2img(g: UIGraph | None = None, seed: int = 5, sampler_inputs=KSAMPLER_IN) -> UIGraph:
    """ComfyUI's default graph (ids as in its default workflow), small sizes."""
    g = g or UIGraph()
    g.add(
        4,
        "CheckpointLoaderSimple",
        outputs=["MODEL", "CLIP", "VAE"],
        widgets=["v1-5-pruned-emaonly.safetensors"],
    )
    g.add(5, "EmptyLatentImage", outputs=["LATENT"], widgets=[64, 64, 1])
    g.add(6, "CLIPTextEncode", [("clip", "CLIP")], ["CONDITIONING"], ["a red fox"])
    g.add(7, "CLIPTextEncode", [("clip", "CLIP")], ["CONDITIONING"], ["blurry"])
    g.add(3, "KSampler", sampler_inputs, ["LATENT"], [seed, "randomize", 2, 7.5, "euler", "karras", 1])
    g.add(8, "VAEDecode", [("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"])
    g.add(9, "SaveImage", [("images", "IMAGE")], [], ["ComfyUI"])
    g.link(4, 1, 6, "clip")
    g.link(4, 1, 7, "clip")
    g.link(4, 0, 3, "model")
    g.link(6, 0, 3, "positive")
    g.link(7, 0, 3, "negative")
    g.link(5, 0, 3, "latent_image")
    g.link(3, 0, 8, "samples")
    g.link(4, 2, 8, "vae")
    g.link(8, 0, 9, "images")
    return g


def txt2img_api(seed: int = 5) -> dict:
    """The API prompt ComfyUI queues for txt2img()."""
    return {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": 2,
                "cfg": 7.5,
                "sampler_name": "euler",
                "scheduler": "karras",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
