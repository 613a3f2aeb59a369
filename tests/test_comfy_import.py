"""ComfyUI API-format workflows (hand-written from ComfyUI's documented format, tests/data/comfy/) convert
to our format and run; unsupported classes are listed in one error; the `prompt` chunk sdgraph writes
into PNGs is itself a runnable API-format workflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from sd_nodes_testing import DATA, SMALL, WORKFLOWS, make_world, pixels, png_text, run, run_cli

from graph.importers import load_workflow
from graph.validate import validate
from graph.workflow import Link

COMFY = DATA / "comfy"


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


def test_default_comfy_workflow_maps_by_table():
    wf = load_workflow(COMFY / "txt2img_api.json")
    assert {n.id: n.type for n in wf.nodes.values()} == {
        "sampler_3": "KSampler", "ckpt_4": "LoadCheckpoint", "latent_5": "EmptyLatent",
        "encode_6": "CLIPEncode", "encode_7": "CLIPEncode", "vae_decode_8": "VAEDecode",
        "save_9": "SaveImage"}
    sampler = wf.nodes["sampler_3"].inputs
    assert sampler["model"] == Link("ckpt_4", "MODEL")
    assert sampler["latent_image"] == Link("latent_5", "LATENT")
    assert wf.nodes["vae_decode_8"].inputs["vae"] == Link("ckpt_4", "VAE")  # output index 2 -> its name
    assert sampler["seed"] == 156680208700286 and sampler["cfg"] == 8
    validate(wf)
    assert wf.source.node_line("sampler_3", "steps") == 5  # errors point into the JSON file


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [("txt2img_api", "ComfyUI_00001_.png"),
                                            ("hires_lora_img2img_api", "hires/fox_00001_.png")])
def test_comfy_workflow_converts_and_both_forms_run(world, tmp_path, name, expected):
    converted = tmp_path / f"{name}.yaml"
    result = run_cli("convert", str(COMFY / f"{name}.json"), "-o", str(converted))
    assert result.rc == 0, result.err
    data = yaml.safe_load(converted.read_text())
    assert "ComfyUI" in data["description"] and all("type" in n for n in data["nodes"].values())

    direct = run(world, COMFY / f"{name}.json")
    assert direct.rc == 0, direct.err
    assert set(direct.statuses().values()) == {"ran"}
    again = run(world, converted)  # the converted file is the same graph: every node is a cache hit
    assert again.rc == 0, again.err
    assert "ran" not in again.statuses().values()
    assert [p.relative_to(world.output).as_posix() for p in world.pngs()] == [expected]


def test_unsupported_classes_are_listed_in_one_error(world):
    result = run(world, COMFY / "unsupported_api.json", as_json=False)
    assert result.rc == 2
    lines = result.err.strip().splitlines()
    assert lines[-1] == "1 error; nothing was run."
    message = lines[0]
    assert message.startswith(f"{COMFY / 'unsupported_api.json'}:4: 2 ComfyUI node type(s)")
    for part in ("StyleModelApply (node 5, 6)", "StyleModelLoader (node 3)",
                 "supported: ", "CLIPSetLastLayer, "):  # the supported list grows: no fixed first name
        assert part in message
    assert "ImageUpscaleWithModel (node" not in message  # supported since the upscale nodes
    assert "ControlNetApply (node" not in message  # supported since the ControlNet nodes
    assert not world.output.exists()


def test_comfy_errors_point_at_the_json(tmp_path):
    data = json.loads((COMFY / "txt2img_api.json").read_text())
    data["3"]["inputs"]["sampler_name"] = "eulr"
    data["8"]["inputs"]["samples"] = ["30", 0]
    path = tmp_path / "bad_api.json"
    path.write_text(json.dumps(data, indent=2))
    result = run_cli("validate", str(path))
    assert result.rc == 2
    assert "node 'vae_decode_8' input 'samples': link to unknown ComfyUI node '30'" in result.err
    wf = data.copy()
    wf["8"]["inputs"]["samples"] = ["3", 0]
    path.write_text(json.dumps(wf, indent=2))
    result = run_cli("validate", str(path))
    assert result.rc == 2
    assert f"{path}:7: node 'sampler_3' input 'sampler_name': 'eulr' is not one of" in result.err


def test_ui_format_is_imported_not_refused(tmp_path):
    """UI files used to be refused; now they import (tests/test_comfy_ui_format.py) and validate as usual."""
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps({"last_node_id": 9, "last_link_id": 9,
                                "nodes": [{"id": 3, "type": "KSampler"}], "links": [], "version": 0.4}))
    result = run_cli("validate", str(path))
    assert result.rc == 2 and "node 'sampler_3' input 'model'" in result.err


@pytest.mark.slow
def test_the_png_prompt_chunk_is_a_runnable_comfy_workflow(world, tmp_path):
    assert run(world, WORKFLOWS / "img2img.yaml", "--set", "steps=2").rc == 0
    [original] = world.pngs()
    api = json.loads(png_text(original)["prompt"])
    assert {n["class_type"] for n in api.values()} == {
        "CheckpointLoaderSimple", "LoadImage", "VAEEncode", "LatentUpscale", "CLIPTextEncode", "KSampler",
        "VAEDecode", "SaveImage"}  # LatentUpscale at 0x0 (img2img's default size) passes the latent on
    path = tmp_path / "from_png_api.json"
    path.write_text(json.dumps(api))
    result = run(world, path, cache=False)
    assert result.rc == 0, result.err
    rerun = [p for p in world.pngs() if p != original]
    assert len(rerun) == 1 and np.array_equal(pixels(rerun[0]), pixels(original))


@pytest.mark.slow
def test_a_png_with_only_a_comfy_prompt_chunk_runs(world, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", (COMFY / "txt2img_api.json").read_text())
    path = tmp_path / "ComfyUI_00042_.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    result = run(world, path)
    assert result.rc == 0, result.err
    assert [p.name for p in world.pngs()] == ["ComfyUI_00001_.png"]


@pytest.mark.slow
def test_an_image_converts_to_our_format(world, tmp_path):
    assert run(world, WORKFLOWS / "txt2img.yaml", *SMALL, "--set", "seed=9").rc == 0
    [png] = world.pngs()
    out = tmp_path / "from_image.yaml"
    assert run_cli("convert", str(png), "-o", str(out)).rc == 0
    data = yaml.safe_load(out.read_text())
    assert data["params"]["seed"] == 9 and data["nodes"]["sampler"]["seed"] == "$seed"
    assert run_cli("validate", str(out), "--models-dir", str(world.models)).rc == 0
