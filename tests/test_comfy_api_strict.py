"""ComfyUI API files are held to ComfyUI's own validation: every required input present (ComfyUI's
validate_inputs answers "Required input is missing"); sdgraph's YAML keeps its defaults. What real
ComfyUI files carry and mean nothing here (LoadImage's legacy `choose file to upload`, a PreviewImage)
is accepted."""

from __future__ import annotations

import json

from sd_nodes_testing import DATA, run_cli

from graph.declare import get_spec
from graph.importers import load_workflow
from graph.validate import validate

COMFY = DATA / "comfy"


def _api(tmp_path, change) -> str:
    data = json.loads((COMFY / "txt2img_api.json").read_text())
    change(data)
    path = tmp_path / "api.json"
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def test_a_missing_required_input_is_refused_naming_node_and_input(tmp_path):
    path = _api(tmp_path, lambda d: (d["3"]["inputs"].pop("seed"), d["5"]["inputs"].pop("batch_size")))
    result = run_cli("validate", path)
    assert result.rc == 2
    assert "node 'sampler_3' input 'seed': required input 'seed' is missing" in result.err
    assert "node 'latent_5' input 'batch_size'" in result.err
    assert f"{path}:2:" in result.err  # at the node's line in the JSON


def test_a_missing_link_input_is_refused_too(tmp_path):
    result = run_cli("validate", _api(tmp_path, lambda d: d["8"]["inputs"].pop("vae")))
    assert result.rc == 2 and "node 'vae_decode_8' input 'vae'" in result.err


def test_sdgraph_yaml_keeps_its_defaults(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("""nodes:
  ckpt: {type: LoadCheckpoint, ckpt_name: m.safetensors}
  pos: {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: a}
  latent: {type: EmptyLatent}
  sampler: {type: KSampler, model: {from: ckpt.MODEL}, positive: {from: pos.CONDITIONING},
            negative: {from: pos.CONDITIONING}, latent_image: {from: latent.LATENT}}
""")
    wf = load_workflow(path)
    assert "seed" not in wf.nodes["sampler"].inputs  # no complaint: the default applies


def test_sdgraph_only_inputs_are_not_required_of_comfy_files(tmp_path):
    wf = load_workflow(COMFY / "hires_lora_img2img_api.json")  # LoraLoader without allow_partial
    assert "allow_partial" not in wf.nodes["lora_2"].inputs


def test_legacy_load_image_input_is_ignored(tmp_path):
    data = json.loads((COMFY / "hires_lora_img2img_api.json").read_text())
    data["prompt"]["7"]["inputs"] = {"image": "example.png", "choose file to upload": "image"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    wf = load_workflow(path)
    assert wf.nodes["image_7"].inputs == {"image": "example.png"}


def test_a_preview_image_is_not_refused(tmp_path):
    path = _api(tmp_path, lambda d: d.update(
        {"10": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}))
    wf = load_workflow(path)
    validate(wf)
    if get_spec("PreviewImage") is None:  # until the node exists it is left out, and the user is told
        assert wf.notes == ["left out PreviewImage (node 10): it only shows an image in ComfyUI's window"]
        assert "note: left out PreviewImage (node 10)" in run_cli("validate", path).err
    else:
        assert any(n.type == get_spec("PreviewImage").type_name for n in wf.nodes.values())
