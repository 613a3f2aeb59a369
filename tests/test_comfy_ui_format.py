"""ComfyUI UI-format workflows (the editor's litegraph JSON) import as the API prompt ComfyUI's frontend
would queue for them (graphToPrompt, ComfyUI_frontend src/utils/executionUtil.ts). The oracle is a
hand-written API twin per construct: both must give the same sdgraph workflow. The twins list every input
(they pass the strict API check), so they also pin the widget order read from the node declarations."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from comfy_ui_builder import KSAMPLER_IN, UIGraph, txt2img, txt2img_api
from sd_nodes_testing import DATA, make_world, run, run_cli

from graph.errors import ValidationFailed
from graph.importers import load_workflow
from graph.validate import validate
from nodes.comfy_import import workflow_from_comfy
from nodes.comfy_ui_import import prompt_from_ui, workflow_from_ui
from nodes.comfy_widgets import widget_names

COMFY = DATA / "comfy"


def assert_same(ui: dict, api: dict) -> None:
    ours = workflow_from_ui(copy.deepcopy(ui))
    twin = workflow_from_comfy(api)
    assert ours.to_data()["nodes"] == twin.to_data()["nodes"]
    validate(ours)


def test_widget_order_comes_from_the_declarations():
    # ComfyUI's KSampler: seed, control_after_generate, steps, cfg, sampler_name, scheduler, denoise
    assert widget_names("KSampler") == [
        "seed",
        "control_after_generate",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "denoise",
    ]
    assert widget_names("KSamplerAdvanced")[:3] == ["add_noise", "noise_seed", "control_after_generate"]
    assert widget_names("LoadImage") == ["image", "upload"]
    assert widget_names("LoraLoader") == ["lora_name", "strength_model", "strength_clip"]  # no allow_partial
    assert widget_names("NoSuchNode") is None


def test_default_workflow_file_matches_its_api_twin():
    ui = load_workflow(COMFY / "txt2img_ui.json")
    api = load_workflow(COMFY / "txt2img_api.json")
    assert ui.to_data()["nodes"] == api.to_data()["nodes"]
    assert "UI workflow" in ui.description


def test_built_default_graph_and_object_links():
    assert_same(txt2img().data(), txt2img_api())
    assert_same(txt2img().data(object_links=True), txt2img_api())  # schema version 1: links as objects
    with_holes = txt2img().data()
    with_holes["links"].insert(2, None)  # saved files can keep null entries for deleted links
    assert_same(with_holes, txt2img_api())


def test_dict_form_widgets_values():
    g = txt2img()
    g.node(3)["widgets_values"] = {
        "seed": 5,
        "control_after_generate": "fixed",
        "steps": 2,
        "cfg": 7.5,
        "sampler_name": "euler",
        "scheduler": "karras",
        "denoise": 1,
    }
    assert_same(g.data(), txt2img_api())


def test_reroutes_notes_and_groups_leave_no_trace():
    g = txt2img()
    vae_link = next(e for e in g.links if e[3] == 8 and e[4] == 1)
    g.links.remove(vae_link)
    g.node(8)["inputs"][1]["link"] = None
    g.add(20, "Reroute", [("", "*")], ["VAE"])
    g.add(21, "Reroute", [("", "*")], ["VAE"])
    g.link(4, 2, 20, "")
    g.link(20, 0, 21, "")
    g.link(21, 0, 8, "vae")
    g.add(30, "Note", widgets=["remember the VAE"])
    g.add(31, "MarkdownNote", widgets=["# hello"])
    data = g.data()
    data["groups"] = [{"id": 1, "title": "Sampling", "bounding": [0, 0, 500, 400]}]
    assert_same(data, txt2img_api())


def test_a_primitive_gives_its_value_to_the_widget_it_feeds():
    inputs = KSAMPLER_IN + [("seed", "INT", "seed")]  # the seed widget converted to an input
    g = txt2img(seed=1, sampler_inputs=inputs)  # the sampler's own (stale) widget value: 1
    g.add(40, "PrimitiveNode", outputs=["INT"], widgets=[777, "increment"])
    g.link(40, 0, 3, "seed")
    assert_same(g.data(), txt2img_api(seed=777))


def test_current_frontend_lists_every_widget_as_an_input():
    widget_inputs = [
        (n, t, n)
        for n, t in (
            ("seed", "INT"),
            ("steps", "INT"),
            ("cfg", "FLOAT"),
            ("sampler_name", "COMBO"),
            ("scheduler", "COMBO"),
            ("denoise", "FLOAT"),
        )
    ]
    g = txt2img(sampler_inputs=KSAMPLER_IN + widget_inputs)  # unlinked: the widget values stand
    assert_same(g.data(), txt2img_api())


def test_muted_nodes_are_left_out_with_their_links():
    g = txt2img()
    g.add(10, "VAEDecode", [("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"])
    g.add(11, "SaveImage", [("images", "IMAGE")], [], ["muted"], mode=2)
    g.link(3, 0, 10, "samples")
    g.link(4, 2, 10, "vae")
    g.link(10, 0, 11, "images")
    api = txt2img_api() | {
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    }
    assert_same(g.data(), api)
    prompt, _ = prompt_from_ui(g.data())
    assert "11" not in prompt


def test_a_muted_source_drops_the_input_it_fed():
    g = txt2img()
    g.node(7)["mode"] = 2  # the negative prompt muted: KSampler's negative goes (ComfyUI then refuses it)
    prompt, _ = prompt_from_ui(g.data())
    assert "7" not in prompt and "negative" not in prompt["3"]["inputs"]
    with pytest.raises(ValidationFailed, match="negative"):
        validate(workflow_from_ui(g.data()))


def test_bypassed_nodes_pass_inputs_of_the_same_type_through():
    g = txt2img()
    for e in list(g.links):  # put a LoRA between the checkpoint and its users, then bypass it
        if e[1] == 4 and e[2] in (0, 1):
            g.links.remove(e)
    g.add(
        12,
        "LoraLoader",
        [("model", "MODEL"), ("clip", "CLIP")],
        ["MODEL", "CLIP"],
        ["detail.safetensors", 0.8, 0.5],
        mode=4,
    )
    g.add(13, "CLIPSetLastLayer", [("clip", "CLIP")], ["CLIP"], [-2], mode=4)
    g.link(4, 0, 12, "model")
    g.link(4, 1, 12, "clip")
    g.link(12, 1, 13, "clip")
    g.link(12, 0, 3, "model")
    g.link(13, 0, 6, "clip")
    g.link(13, 0, 7, "clip")
    assert_same(g.data(), txt2img_api())


def test_bypass_picks_the_first_input_of_the_type_when_the_slot_differs():
    g = txt2img()
    g.links = [e for e in g.links if not (e[3] == 8 and e[4] == 0)]
    g.node(8)["inputs"][0]["link"] = None
    # LatentUpscale's only input is LATENT at slot 0; ask through an output slot that has no input twin
    g.add(14, "KSampler", KSAMPLER_IN, ["LATENT"], [9, "fixed", 2, 7.5, "euler", "karras", 1], mode=4)
    g.link(3, 0, 14, "latent_image")  # slot 3 holds the LATENT; output 0 is LATENT: first LATENT input
    g.link(4, 0, 14, "model")
    g.link(14, 0, 8, "samples")
    assert_same(g.data(), txt2img_api())


def group_node_graph() -> UIGraph:
    """ComfyUI's group node: the checkpoint and both prompts as one node `workflow>Loader`."""
    g = UIGraph()
    g.extra["groupNodes"] = {
        "Loader": {
            "nodes": [
                {
                    "id": -1,
                    "index": 0,
                    "type": "CheckpointLoaderSimple",
                    "inputs": [],
                    "outputs": [
                        {"name": "MODEL", "type": "MODEL", "links": []},
                        {"name": "CLIP", "type": "CLIP", "links": [1, 2]},
                        {"name": "VAE", "type": "VAE", "links": []},
                    ],
                    "widgets_values": ["old.safetensors"],
                },
                {
                    "id": -1,
                    "index": 1,
                    "type": "CLIPTextEncode",
                    "inputs": [{"name": "clip", "type": "CLIP", "link": 1}],
                    "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": []}],
                    "widgets_values": ["x"],
                },
                {
                    "id": -1,
                    "index": 2,
                    "type": "CLIPTextEncode",
                    "inputs": [{"name": "clip", "type": "CLIP", "link": 2}],
                    "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": []}],
                    "widgets_values": ["y"],
                },
            ],
            "links": [[0, 1, 1, 0, 4, "CLIP"], [0, 1, 2, 0, 4, "CLIP"]],
            "external": [],
        }
    }
    # outputs of the group: MODEL, VAE, CONDITIONING, CONDITIONING (CLIP is used inside only)
    g.add(
        10,
        "workflow>Loader",
        outputs=["MODEL", "VAE", "CONDITIONING", "CONDITIONING"],
        widgets=["v1-5-pruned-emaonly.safetensors", "a red fox", "blurry"],
    )
    g.add(5, "EmptyLatentImage", outputs=["LATENT"], widgets=[64, 64, 1])
    g.add(3, "KSampler", KSAMPLER_IN, ["LATENT"], [5, "randomize", 2, 7.5, "euler", "karras", 1])
    g.add(8, "VAEDecode", [("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"])
    g.add(9, "SaveImage", [("images", "IMAGE")], [], ["ComfyUI"])
    g.link(10, 0, 3, "model")
    g.link(10, 2, 3, "positive")
    g.link(10, 3, 3, "negative")
    g.link(5, 0, 3, "latent_image")
    g.link(3, 0, 8, "samples")
    g.link(10, 1, 8, "vae")
    g.link(8, 0, 9, "images")
    return g


def test_group_nodes_expand_into_their_inner_nodes():
    api = txt2img_api()
    api["10:0"], api["10:1"], api["10:2"] = api.pop("4"), api.pop("6"), api.pop("7")
    api["10:1"]["inputs"]["clip"] = api["10:2"]["inputs"]["clip"] = ["10:0", 1]
    api["3"]["inputs"].update(model=["10:0", 0], positive=["10:1", 0], negative=["10:2", 0])
    api["8"]["inputs"]["vae"] = ["10:0", 2]
    assert_same(group_node_graph().data(), api)


def test_a_group_node_input_feeds_the_inner_socket_it_stands_for():
    g = txt2img()
    g.extra["groupNodes"] = {
        "Prompts": {
            "nodes": [
                {
                    "index": i,
                    "type": "CLIPTextEncode",
                    "inputs": [{"name": "clip", "type": "CLIP", "link": None}],
                    "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": []}],
                    "widgets_values": ["stale"],
                }
                for i in range(2)
            ],
            "links": [],
            "external": [],
        }
    }
    g.nodes = [n for n in g.nodes if n["id"] not in (6, 7)]
    g.links = [e for e in g.links if e[1] not in (6, 7) and e[3] not in (6, 7)]
    for inp in g.node(3)["inputs"][1:3]:
        inp["link"] = None
    g.add(
        11,
        "workflow>Prompts",
        [("clip", "CLIP"), ("CLIPTextEncode clip", "CLIP")],
        ["CONDITIONING", "CONDITIONING"],
        ["a red fox", "blurry"],
    )
    g.link(4, 1, 11, "clip")
    g.link(4, 1, 11, "CLIPTextEncode clip")
    g.link(11, 0, 3, "positive")
    g.link(11, 1, 3, "negative")
    api = txt2img_api()
    api["11:0"], api["11:1"] = api.pop("6"), api.pop("7")
    api["3"]["inputs"].update(positive=["11:0", 0], negative=["11:1", 0])
    assert_same(g.data(), api)


SUBGRAPH_ID = "8c1f4a3e-0000-4000-8000-000000000001"


def subgraph_graph(promoted_seed: int | None = 123) -> UIGraph:
    """The sampler inside a subgraph (current frontend): inputs model, positive, negative, latent and the
    seed widget, promoted to the instance; output LATENT."""
    g = txt2img()
    g.nodes = [n for n in g.nodes if n["id"] != 3]
    g.links = [e for e in g.links if 3 not in (e[1], e[3])]
    for n in g.nodes:
        for inp in n["inputs"]:
            if inp["link"] is not None and inp["link"] not in [e[0] for e in g.links]:
                inp["link"] = None
        for out in n["outputs"]:
            out["links"] = [i for i in out["links"] if i in [e[0] for e in g.links]]
    inner = UIGraph()
    inner.add(
        3,
        "KSampler",
        KSAMPLER_IN + [("seed", "INT", "seed")],
        ["LATENT"],
        [1, "fixed", 2, 7.5, "euler", "karras", 1],
    )
    links = []
    for slot, name in enumerate(["model", "positive", "negative", "latent_image", "seed"]):
        link_id = slot + 1
        index = next(i for i, inp in enumerate(inner.node(3)["inputs"]) if inp["name"] == name)
        inner.node(3)["inputs"][index]["link"] = link_id
        links.append(
            {
                "id": link_id,
                "origin_id": -10,
                "origin_slot": slot,
                "target_id": 3,
                "target_slot": index,
                "type": "*",
            }
        )
    links.append(
        {"id": 9, "origin_id": 3, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "LATENT"}
    )
    io = [
        ("model", "MODEL"),
        ("positive", "CONDITIONING"),
        ("negative", "CONDITIONING"),
        ("latent_image", "LATENT"),
        ("seed", "INT"),
    ]
    g.definitions.append(
        {
            "id": SUBGRAPH_ID,
            "version": 1,
            "name": "Sampler",
            "state": {},
            "revision": 0,
            "inputNode": {"id": -10, "bounding": [0, 0, 10, 10]},
            "outputNode": {"id": -20, "bounding": [0, 0, 10, 10]},
            "inputs": [
                {"id": f"in{i}", "name": n, "type": t, "linkIds": [i + 1]} for i, (n, t) in enumerate(io)
            ],
            "outputs": [{"id": "out0", "name": "LATENT", "type": "LATENT", "linkIds": [9]}],
            "widgets": [],
            "nodes": inner.nodes,
            "links": links,
        }
    )
    g.add(
        12,
        SUBGRAPH_ID,
        [(n, t) for n, t in io[:4]] + [("seed", "INT", "seed")],
        ["LATENT"],
        [promoted_seed] if promoted_seed is not None else None,
    )
    g.link(4, 0, 12, "model")
    g.link(6, 0, 12, "positive")
    g.link(7, 0, 12, "negative")
    g.link(5, 0, 12, "latent_image")
    g.link(12, 0, 8, "samples")
    return g


def test_subgraphs_flatten_to_instance_scoped_ids():
    api = txt2img_api(seed=123)
    api["12:3"] = api.pop("3")
    api["8"]["inputs"]["samples"] = ["12:3", 0]
    assert_same(subgraph_graph().data(), api)


def test_a_subgraph_input_linked_outside_reaches_the_inner_node():
    g = subgraph_graph(promoted_seed=None)
    g.add(40, "PrimitiveNode", outputs=["INT"], widgets=[31337, "fixed"])
    g.link(40, 0, 12, "seed")
    api = txt2img_api(seed=31337)
    api["12:3"] = api.pop("3")
    api["8"]["inputs"]["samples"] = ["12:3", 0]
    assert_same(g.data(), api)


def test_nested_subgraphs_chain_instance_ids():
    g = subgraph_graph()
    inner_instance = g.node(12)
    outer_id = "8c1f4a3e-0000-4000-8000-000000000002"
    # the outer subgraph holds an instance (id 50) of the sampler subgraph, its 4 inputs and output wired
    # through the outer subgraph's own input and output nodes
    nested = {
        "id": 50,
        "type": SUBGRAPH_ID,
        "mode": 0,
        "properties": {},
        "widgets_values": [123],
        "inputs": [dict(inp, link=i + 1) for i, inp in enumerate(inner_instance["inputs"][:4])]
        + [dict(inner_instance["inputs"][4], link=None)],
        "outputs": [{"name": "LATENT", "type": "LATENT", "links": [9]}],
    }
    links = [
        {"id": i + 1, "origin_id": -10, "origin_slot": i, "target_id": 50, "target_slot": i, "type": "*"}
        for i in range(4)
    ]
    links.append(
        {"id": 9, "origin_id": 50, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "LATENT"}
    )
    outer = copy.deepcopy(g.definitions[0]) | {
        "id": outer_id,
        "name": "Outer",
        "nodes": [nested],
        "links": links,
    }
    outer["inputs"] = outer["inputs"][:4]
    g.definitions.append(outer)
    inner_instance["type"] = outer_id
    inner_instance["inputs"] = inner_instance["inputs"][:4]
    inner_instance["widgets_values"] = []
    api = txt2img_api(seed=123)
    api["12:50:3"] = api.pop("3")
    api["8"]["inputs"]["samples"] = ["12:50:3", 0]
    assert_same(g.data(), api)


def test_a_subgraph_instance_saved_without_inputs_still_gives_its_widget_values():
    # the frontend rebuilds an instance's inputs from the definition; files may leave them out
    inner = UIGraph()
    inner.add(
        1,
        "CheckpointLoaderSimple",
        [("ckpt_name", "COMBO", "ckpt_name")],
        ["MODEL", "CLIP", "VAE"],
        ["inner.safetensors"],
    )
    inner.node(1)["inputs"][0]["link"] = 1
    g = UIGraph()
    g.definitions.append(
        {
            "id": "sg-loader",
            "name": "Loader",
            "nodes": inner.nodes,
            "outputs": [],
            "inputs": [{"id": "i0", "name": "ckpt_name", "type": "COMBO", "linkIds": [1]}],
            "links": [
                {
                    "id": 1,
                    "origin_id": -10,
                    "origin_slot": 0,
                    "target_id": 1,
                    "target_slot": 0,
                    "type": "COMBO",
                }
            ],
        }
    )
    g.add(2, "sg-loader", widgets=["promoted.safetensors"])
    prompt, _ = prompt_from_ui(g.data())
    assert prompt == {
        "2:1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "promoted.safetensors"},
            "_meta": {"title": "CheckpointLoaderSimple"},
        }
    }


def test_subgraph_proxy_widgets_carry_inner_widget_values():
    g = subgraph_graph(promoted_seed=None)
    instance = g.node(12)
    instance["properties"]["proxyWidgets"] = [["3", "cfg"], ["-1", "seed"]]
    instance["widgets_values"] = [4.5, 999]
    api = txt2img_api(seed=999)
    api["12:3"] = api.pop("3")
    api["12:3"]["inputs"]["cfg"] = 4.5
    api["8"]["inputs"]["samples"] = ["12:3", 0]
    assert_same(g.data(), api)


def test_unknown_node_types_are_named_with_their_ids(tmp_path):
    g = txt2img()
    g.add(15, "StyleModelApply", [("conditioning", "CONDITIONING")], ["CONDITIONING"], [1.0])
    g.link(6, 0, 15, "conditioning")
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(g.data()))
    result = run_cli("validate", str(path))
    assert result.rc == 2
    assert "StyleModelApply (node 15)" in result.err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d["nodes"][2]["inputs"][0].update(link=99), "link 99 is not in the links table"),
        (lambda d: d["links"].__setitem__(0, [1, 4]), "a link must be"),
        (
            lambda d: d["nodes"][0].update(type="workflow>Nowhere"),
            "'Nowhere', which extra.groupNodes does not",
        ),
    ],
)
def test_broken_ui_files_give_one_clear_error(tmp_path, damage, message):
    data = txt2img().data()
    damage(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    result = run_cli("validate", str(path))
    assert result.rc == 2 and message in result.err and "Traceback" not in result.err


def test_reroute_cycles_are_refused(tmp_path):
    g = txt2img()
    g.add(20, "Reroute", [("", "*")], ["VAE"])
    g.add(21, "Reroute", [("", "*")], ["VAE"])
    g.link(20, 0, 21, "")
    g.link(21, 0, 20, "")
    g.node(8)["inputs"][1]["link"] = None
    g.link(21, 0, 8, "vae")
    with pytest.raises(ValidationFailed, match="circle"):
        workflow_from_ui(g.data())


def _png(path, **chunks):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_a_png_workflow_chunk_and_its_prompt_chunk_agree(tmp_path):
    ui, api = json.dumps(group_node_graph().data()), workflow_from_ui(group_node_graph().data())
    only_ui = load_workflow(_png(tmp_path / "ui.png", workflow=ui))
    assert only_ui.to_data()["nodes"] == api.to_data()["nodes"]
    prompt, _ = prompt_from_ui(group_node_graph().data())
    both = load_workflow(_png(tmp_path / "both.png", workflow=ui, prompt=json.dumps(prompt)))
    assert both.to_data()["nodes"] == only_ui.to_data()["nodes"]


def test_convert_round_trip_keeps_the_workflow(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps(subgraph_graph().data()))
    out = tmp_path / "x.yaml"
    result = run_cli("convert", str(ui), "-o", str(out))
    assert result.rc == 0, result.err
    data = yaml.safe_load(out.read_text())
    assert data["nodes"] == load_workflow(ui).to_data()["nodes"]
    assert load_workflow(out).to_data()["nodes"] == data["nodes"]


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@pytest.mark.slow
def test_a_ui_file_runs_and_its_conversion_is_the_same_graph(world, tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps(group_node_graph().data()))
    direct = run(world, ui)
    assert direct.rc == 0, direct.err
    assert set(direct.statuses().values()) == {"ran"}
    out = tmp_path / "x.yaml"
    assert run_cli("convert", str(ui), "-o", str(out)).rc == 0
    again = run(world, out)
    assert again.rc == 0 and "ran" not in again.statuses().values()


@pytest.mark.slow
def test_the_shipped_ui_example_runs_after_demo(world):
    from sd_nodes_testing import WORKFLOWS

    from graph.declare import get_spec

    small = ["--set", "latent_5.width=64", "--set", "latent_5.height=64", "--set", "sampler_3.steps=2"]
    result = run(world, WORKFLOWS / "comfyui_ui.json", *small)
    assert result.rc == 0, result.err
    if get_spec("PreviewImage") is None:
        assert "left out PreviewImage (node 12)" in result.err
    assert "comfyui_ui_00001_.png" in [p.name for p in world.pngs()]
