"""ComfyUI's everyday loader/output nodes: sampler aliases, CheckpointLoader's config check,
LoraLoaderModelOnly, VAELoader's recipe, SaveLatent/LoadLatent in ComfyUI's .latent format (its formula for
old files), PreviewImage (never in the output folder, never an error), and SaveImage's prefix tokens as
ComfyUI's frontend and server expand them."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, reset_loads, run

from graph import Folders
from graph.errors import ValidationFailed
from graph.validate import validate
from graph.workflow import parse_workflow
from nodes import images, latent_files, loaders, models
from nodes.checkpoint_configs import config_clip_layer
from nodes.prefix_tokens import expand_prefix, format_date
from nodes.values import FileRef, Latent, ModelRecipe, VaeRecipe


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


class Ctx:
    def __init__(self, folders, node_id="n", run_info=None):
        self.folders = folders
        self.node_id = node_id
        self.run_info = run_info or {}
        self.messages: list[str] = []
        self.written: list = []
        from graph.fingerprint import FingerprintIndex

        self.fingerprint = FingerprintIndex().fingerprint

    @property
    def output_dir(self):
        return self.folders.output_dir

    def log(self, msg: str) -> None:
        self.messages.append(msg)

    def check_cancelled(self) -> None:
        pass

    def output_file(self, path, overwrite=True):
        from graph import atomic_path

        return atomic_path(path, overwrite, on_published=self.written.append)


SAMPLER_WF = """
nodes:
  ckpt: {type: LoadCheckpoint, ckpt_name: v1-5-pruned-emaonly.safetensors}
  pos:  {type: CLIPTextEncode, clip: {from: ckpt.CLIP}, text: a}
  lat:  {type: EmptyLatentImage, width: 64, height: 64}
  s:    {type: KSampler, model: {from: ckpt.MODEL}, positive: {from: pos.CONDITIONING},
         negative: {from: pos.CONDITIONING}, latent_image: {from: lat.LATENT}, sampler_name: NAME}
  d:    {type: VAEDecode, samples: {from: s.LATENT}, vae: {from: ckpt.VAE}}
  out:  {type: SaveImage, images: {from: d.IMAGE}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("name,canonical", [
    # the *_gpu SDE samplers are samplers of their own (their tree's generator differs in noise_device cuda)
    ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde_gpu"), ("dpmpp_sde_gpu", "dpmpp_sde_gpu"),
    ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde_gpu"), ("sample_euler", "euler"),
    ("sample_dpmpp_2m", "dpmpp_2m"), ("euler", "euler")])
def test_sampler_aliases_become_the_sampler(name, canonical):
    bound = validate(parse_workflow(SAMPLER_WF.replace("NAME", name), "wf.yaml", "yaml"))
    assert bound["s"].literals["sampler_name"] == canonical  # so the cache key is the sampler's too
    with pytest.raises(ValidationFailed, match="not one of"):
        validate(parse_workflow(SAMPLER_WF.replace("NAME", "dpmpp_9m"), "wf.yaml", "yaml"))


def test_sdgraph_nodes_lists_samplers_not_aliases():
    import cli
    from graph.declare import get_spec

    text = cli.describe_node(get_spec("KSampler"))
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("sampler_name"))
    assert "dpmpp_2m_sde," in line and "dpmpp_2m_sde_gpu," in line and "sample_" not in line


def test_checkpoint_loader_config_names(tmp_path):
    folders = Folders(tmp_path / "models", tmp_path / "in", tmp_path / "out")
    assert config_clip_layer("v1-inference.yaml", folders) == -1
    assert config_clip_layer("v1-inference_clip_skip_2.yaml", folders) == -2
    assert config_clip_layer("v1-inpainting-inference.yaml", folders) == -1  # 9-channel UNets load
    for refused in ("v2-inference-v.yaml", "v2-inpainting-inference.yaml"):
        with pytest.raises(ValueError, match="SD2.x or v-prediction"):
            config_clip_layer(refused, folders)
    with pytest.raises(ValueError, match="neither a file"):
        config_clip_layer("mystery.yaml", folders)
    configs = tmp_path / "models" / "configs"
    configs.mkdir(parents=True)
    (configs / "mine.yaml").write_text(
        "model:\n  params:\n    cond_stage_config:\n"
        "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
        "      params: {layer: hidden, layer_idx: -3}\n")
    assert config_clip_layer("mine.yaml", folders) == -3
    (configs / "vpred.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    with pytest.raises(ValueError, match="v-prediction"):
        config_clip_layer("vpred.yaml", folders)
    (configs / "evil.yaml").write_text("model: !!python/object/apply:os.system ['echo no']\n")
    with pytest.raises(ValueError, match="not an LDM model config"):
        config_clip_layer("evil.yaml", folders)
    (configs / "odd.yaml").write_text("model:\n  params:\n    unet_config: just text\n")
    with pytest.raises(ValueError, match="unexpected structure"):
        config_clip_layer("odd.yaml", folders)


def test_checkpoint_loader_refuses_a_config_at_validation(world):
    text = (f"nodes:\n  c: {{type: CheckpointLoader, config_name: CFG, ckpt_name: {world.checkpoint.name}}}\n"
            "  s: {type: SaveLatent, samples: {from: e.LATENT}}\n  e: {type: EmptyLatentImage}\n")
    folders = Folders(world.models, world.input, world.output)
    validate(parse_workflow(text.replace("CFG", "v1-inference.yaml"), "wf.yaml", "yaml"), folders)
    with pytest.raises(ValidationFailed) as e:
        validate(parse_workflow(text.replace("CFG", "v2-inference-v.yaml"), "wf.yaml", "yaml"), folders)
    assert "node 'c' input 'config_name'" in str(e.value) and "v-prediction" in str(e.value)


@pytest.mark.slow
def test_checkpoint_loader_sets_clip_skip_and_lora_model_only(world):
    ctx = Ctx(Folders(world.models, world.input, world.output))
    model, clip, vae = loaders.CheckpointLoader("v1-inference_clip_skip_2.yaml", world.checkpoint.name,
                                                ctx=ctx)
    assert clip.stop_at_layer == -2 and vae.source == "checkpoint" and model.patches == ()
    patched = loaders.LoraLoaderModelOnly(model, "detail.safetensors", 0.5, ctx=ctx)
    assert [p.strength for p in patched.patches] == [0.5] and isinstance(patched, ModelRecipe)
    assert "text encoder" not in ctx.messages[-1]


def test_vae_loader_names_its_source(world):
    ctx = Ctx(Folders(world.models, world.input, world.output))
    recipe = loaders.VAELoader("vae-ft-mse-840000-ema-pruned.safetensors", ctx=ctx)
    assert recipe.source == "vae_file"
    assert recipe.checkpoint.name == "vae-ft-mse-840000-ema-pruned.safetensors"
    with pytest.raises(Exception, match="no VAE weights|belong to no VAE"):
        loaders.VAELoader(str(world.models / "loras" / "detail.safetensors"), ctx=ctx)
    with pytest.raises(ValueError):
        VaeRecipe(recipe.checkpoint, source="lora")


def test_save_latent_writes_comfyui_format_and_load_latent_reads_it(tmp_path):
    folders = Folders(tmp_path / "m", tmp_path / "input", tmp_path / "output")
    samples = np.random.default_rng(0).standard_normal((2, 5, 6, 4)).astype(np.float32)  # NHWC
    ctx = Ctx(folders, run_info={"workflow": {"nodes": {}}})
    latent_files.SaveLatent(Latent(mx.array(samples)), "latents/test", ctx=ctx)
    [path] = ctx.written
    assert path == tmp_path / "output" / "latents" / "test_00001_.latent"
    data = load_file(str(path))  # as ComfyUI reads it
    assert set(data) == {"latent_tensor", "latent_format_version_0"}
    assert data["latent_format_version_0"].numel() == 0
    np.testing.assert_array_equal(data["latent_tensor"].numpy(), samples.transpose(0, 3, 1, 2))
    (tmp_path / "input").mkdir()
    path.rename(tmp_path / "input" / "a.latent")
    back = latent_files.LoadLatent("a.latent", ctx=ctx)
    np.testing.assert_array_equal(np.array(back.samples), samples)

    # ComfyUI's first format: no marker, stored x 0.18215; ComfyUI multiplies by 1 / 0.18215
    old = torch.from_numpy(samples.transpose(0, 3, 1, 2).copy())
    save_file({"latent_tensor": old.numpy()}, str(tmp_path / "input" / "old.latent"))
    want = (old.float() * (1.0 / 0.18215)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.array(latent_files.LoadLatent("old.latent", ctx=ctx).samples), want)

    save_file({"x": samples}, str(tmp_path / "input" / "bad.latent"))
    with pytest.raises(ValueError, match="holds no 'latent_tensor'"):
        latent_files.LoadLatent("bad.latent", ctx=ctx)
    with pytest.raises(ValueError, match="outside"):
        latent_files.SaveLatent(Latent(mx.array(samples)), "../escape", ctx=ctx)


def test_preview_image_writes_outside_the_output_folder_and_never_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "preview_dir", lambda: tmp_path / "previews")
    ctx = Ctx(Folders(tmp_path / "m", tmp_path / "in", tmp_path / "output"), node_id="p")
    images.PreviewImage(mx.zeros((2, 8, 8, 3)), ctx=ctx)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["p_00001_.png",
                                                                        "p_00002_.png"]
    assert not (tmp_path / "output").exists() and ctx.written == []
    assert ctx.messages[0].startswith("preview: ")
    (tmp_path / "blocked").write_text("a file where the folder would be")
    monkeypatch.setattr(images, "preview_dir", lambda: tmp_path / "blocked" / "previews")
    images.PreviewImage(mx.zeros((1, 8, 8, 3)), ctx=ctx)
    assert ctx.messages[-1].startswith("previews skipped")


def test_date_tokens_follow_comfyui_frontend():
    now = time.struct_time((2024, 3, 7, 9, 5, 2, 0, 67, -1))
    assert format_date("yyyy-MM-dd", now) == "2024-03-07"
    assert format_date("yy.M.d hh:mm:ss", now) == "24.3.7 09:05:02"
    assert format_date("h-m-s", now) == "9-5-2"
    assert expand_prefix("%date:yyyyMMdd%/img_%year%-%month%-%day%_%width%x%height%", {}, 64, 48,
                         now) == "20240307/img_2024-03-07_64x48"


def test_node_tokens_take_the_literal_of_a_node_by_id_or_type():
    wf = {"params": {"seed": 7}, "nodes": {
        "ckpt": {"type": "LoadCheckpoint", "ckpt_name": "sd15/dreamy.safetensors"},
        "sampler": {"type": "KSampler", "seed": "$seed", "model": {"from": "ckpt.MODEL"}},
    }}
    # params substituted, defaults filled in
    assert expand_prefix("%KSampler.seed%_%sampler.steps%_%KSampler.cfg%", wf) == "7_20_8.0"
    assert expand_prefix("%CheckpointLoaderSimple.ckpt_name%", wf) == "sd15_dreamy.safetensors"  # / -> _
    assert expand_prefix("%KSampler.model%_%Nope.seed%_%bad%", wf) == "%KSampler.model%_%Nope.seed%_%bad%"


def test_save_image_expands_tokens_and_keeps_the_path_checks(tmp_path):
    ctx = Ctx(Folders(tmp_path / "m", tmp_path / "in", tmp_path / "output"),
              run_info={"workflow": {"nodes": {"s": {"type": "KSampler", "seed": 3},
                                               "t": {"type": "CLIPEncode", "text": ".."}}}})
    images.SaveImage(mx.zeros((1, 8, 8, 3)), "%date:yyyy%/seed%KSampler.seed%", ctx=ctx)
    [path] = ctx.written
    assert path.parent.name == time.strftime("%Y") and path.name == "seed3_00001_.png"
    with pytest.raises(ValueError, match="outside the output folder"):
        images.SaveImage(mx.zeros((1, 8, 8, 3)), "%t.text%/%t.text%/x", ctx=ctx)


@pytest.mark.slow
def test_external_vae_workflow_uses_the_vae_file(world, tmp_path):
    reset_loads()
    result = run(world, WORKFLOWS / "external_vae.yaml", *SMALL)
    assert result.rc == 0, result.err
    assert [p.name for p in world.pngs()] == ["external_vae_00001_.png"]
    assert models.LOAD_COUNTS["vae"] == 1  # the VAE file's; the checkpoint's VAE is never read
    vae_file = FileRef.of(world.models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")
    assert models.STORE.key_of(models.vae_for(VaeRecipe(vae_file, source="vae_file"))) == \
        ("vae-file", vae_file.identity)
    assert models.LOAD_COUNTS["vae"] == 1  # that was the store's entry, not a second load
    # another VAE re-runs the decode only: sampling and the encodings are cache hits
    from nodes.demo import write_vae

    other = write_vae(tmp_path / "other_vae.safetensors", seed=9)
    again = run(world, WORKFLOWS / "external_vae.yaml", *SMALL, "--set", f"vae={other}")
    assert again.rc == 0, again.err
    assert again.statuses()["sampler"] != "ran" and again.statuses()["decode"] == "ran"
