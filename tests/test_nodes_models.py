"""Nodes over real (tiny) models: LoadLoRA reads no model weights, a LoRA that does not fit fails at its
node, KSampler reports progress per step and stops when cancelled (leaving no files), VAEEncode crops."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, reset_loads, run

from graph import Folders
from graph.disk_cache import DiskCache
from graph.errors import Cancelled
from graph.executor import Caches, Executor, RunEvents
from graph.fingerprint import FingerprintIndex
from graph.importers import load_workflow
from graph.plan import make_plan
from graph.runner import prepare
from graph.sweep import parse_assignment
from nodes import loaders, models
from nodes.latents import VAEEncode
from nodes.values import ClipRecipe, FileRef, ModelRecipe, VaeRecipe


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


class Ctx:
    def __init__(self, folders):
        self.folders = folders
        self.messages: list[str] = []
        self.cancel_event = threading.Event()
        self.fingerprint = FingerprintIndex().fingerprint

    def log(self, msg: str) -> None:
        self.messages.append(msg)


@pytest.mark.slow
def test_load_lora_reads_only_the_lora_and_reports_coverage(world):
    reset_loads()
    ctx = Ctx(Folders(world.models, world.input, world.output))
    ref = FileRef.of(world.checkpoint)
    model, clip = loaders.LoadLoRA(ModelRecipe(ref), ClipRecipe(ref), "detail.safetensors", 0.7, 0.0, ctx=ctx)
    assert dict(models.LOAD_COUNTS) == {"lora": 1}  # no UNet, no text encoder
    assert [p.strength for p in model.patches] == [0.7] and clip.patches == ()
    assert len(ctx.messages) == 1 and ctx.messages[0].startswith("LoRA detail.safetensors: unet ")
    assert "text encoder" not in ctx.messages[0]  # strength 0: not applied, not reported


@pytest.mark.slow
def test_a_lora_for_another_model_fails_at_its_node(world, tmp_path):
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (tmp_path / "models" / "checkpoints").symlink_to(world.models / "checkpoints")
    rng = np.random.default_rng(0)
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": rng.random((4, 640), np.float32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": rng.random((640, 4), np.float32)},
              str(loras / "detail.safetensors"))
    (loras / "style.safetensors").symlink_to(world.models / "loras" / "style.safetensors")
    world.models = tmp_path / "models"
    reset_loads()
    result = run(world, WORKFLOWS / "multi_lora.yaml", *SMALL, as_json=False)
    assert result.rc == 1
    assert "node 'lora1' (LoadLoRA) failed" in result.err and "detail.safetensors" in result.err
    assert "unet" not in models.LOAD_COUNTS
    assert not world.output.exists() or not list(world.output.iterdir())

    partial = run(world, WORKFLOWS / "multi_lora.yaml", *SMALL, "--set", "lora1.allow_partial=true",
                  as_json=False)
    assert partial.rc == 0, partial.err
    assert "1 layer(s) of detail.safetensors match nothing in the unet 0/1" in partial.err


class Recorder(RunEvents):
    def __init__(self, executor_ref: list, cancel_at: int | None = None):
        self.steps: list[tuple[str, int, int]] = []
        self.executor_ref, self.cancel_at = executor_ref, cancel_at

    def progress(self, node_id: str, step: int, total: int) -> None:
        self.steps.append((node_id, step, total))
        if step == self.cancel_at:
            self.executor_ref[0].cancel()


def _txt2img(world, cancel_at=None, steps=3):
    folders = Folders(world.models, world.input, world.output)
    ref: list = []
    events = Recorder(ref, cancel_at)
    executor = Executor(Caches(world.cache, DiskCache(world.cache)), folders, events)
    ref.append(executor)
    sets = [parse_assignment(s) for s in ("width=64", "height=64", f"steps={steps}")]
    [pv] = prepare(load_workflow(WORKFLOWS / "txt2img.yaml"), sets, [], folders)
    return executor, events, make_plan(pv.bound, executor.caches.fingerprints), pv


@pytest.mark.slow
def test_ksampler_reports_each_step(world):
    executor, events, plan, pv = _txt2img(world)
    executor.run(plan, pv.run_info())
    assert events.steps == [("sampler", 1, 3), ("sampler", 2, 3), ("sampler", 3, 3)]


@pytest.mark.slow
def test_cancelling_mid_sampling_stops_between_steps_and_leaves_no_files(world):
    executor, events, plan, pv = _txt2img(world, cancel_at=1, steps=4)
    with pytest.raises(Cancelled):
        executor.run(plan, pv.run_info())
    assert events.steps[-1][1] == 1  # no step after the cancelling one
    assert not world.output.exists() or not list(world.output.rglob("*.png"))


@pytest.mark.slow
def test_vae_encode_crops_to_multiples_of_8_centred(world):
    ctx = Ctx(Folders(world.models, world.input, world.output))
    pixels = mx.array(np.random.default_rng(0).random((1, 70, 67, 3), dtype=np.float32))
    latent = VAEEncode(pixels, VaeRecipe(FileRef.of(world.checkpoint)), ctx=ctx)
    assert latent.samples.shape == (1, 8, 8, 4) and latent.samples.dtype == mx.float32
    cropped = pixels[:, 3:67, 1:65, :]
    same = VAEEncode(cropped, VaeRecipe(FileRef.of(world.checkpoint)), ctx=ctx)
    assert np.array_equal(np.array(same.samples), np.array(latent.samples))


BRANCHES = """
nodes:
  ckpt:  {type: LoadCheckpoint, ckpt_name: v1-5-pruned-emaonly.safetensors}
  a:     {type: LoadLoRA, model: {from: ckpt.MODEL}, clip: {from: ckpt.CLIP}, lora_name: detail.safetensors}
  b:     {type: LoadLoRA, model: {from: ckpt.MODEL}, clip: {from: ckpt.CLIP}, lora_name: style.safetensors,
          strength_model: -0.5}
  pos_a: {type: CLIPEncode, clip: {from: a.CLIP}, text: a cat}
  pos_b: {type: CLIPEncode, clip: {from: b.CLIP}, text: a cat}
  neg:   {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: ''}
  empty: {type: EmptyLatent, width: 64, height: 64}
  ks_a:  {type: KSampler, model: {from: a.MODEL}, positive: {from: pos_a.CONDITIONING},
          negative: {from: neg.CONDITIONING}, latent_image: {from: empty.LATENT}, steps: 2}
  ks_b:  {type: KSampler, model: {from: b.MODEL}, positive: {from: pos_b.CONDITIONING},
          negative: {from: neg.CONDITIONING}, latent_image: {from: empty.LATENT}, steps: 2}
  ks_0:  {type: KSampler, model: {from: ckpt.MODEL}, positive: {from: neg.CONDITIONING},
          negative: {from: neg.CONDITIONING}, latent_image: {from: empty.LATENT}, steps: 2}
  dec_a: {type: VAEDecode, samples: {from: ks_a.LATENT}, vae: {from: ckpt.VAE}}
  dec_b: {type: VAEDecode, samples: {from: ks_b.LATENT}, vae: {from: ckpt.VAE}}
  dec_0: {type: VAEDecode, samples: {from: ks_0.LATENT}, vae: {from: ckpt.VAE}}
  save_a: {type: SaveImage, images: {from: dec_a.IMAGE}, filename_prefix: a}
  save_b: {type: SaveImage, images: {from: dec_b.IMAGE}, filename_prefix: b}
  save_0: {type: SaveImage, images: {from: dec_0.IMAGE}, filename_prefix: base}
"""


@pytest.mark.slow
def test_branches_with_different_loras_share_one_base(world, tmp_path):
    from sd_nodes_testing import pixels

    path = tmp_path / "branches.yaml"
    path.write_text(BRANCHES)
    reset_loads()
    result = run(world, path)
    assert result.rc == 0, result.err
    assert (models.LOAD_COUNTS["unet"], models.LOAD_COUNTS["clip"], models.LOAD_COUNTS["vae"]) == (1, 1, 1)
    assert models.LOAD_COUNTS["lora"] == 2
    a, b, base = (pixels(world.output / f"{p}_00001_.png") for p in ("a", "b", "base"))
    assert not np.array_equal(a, b) and not np.array_equal(a, base) and not np.array_equal(b, base)

    # the base weights were not modified by the patched branches: a base-only run gives the same image
    keep = ("ckpt", "neg", "empty", "ks_0", "dec_0", "save_0")
    lines = BRANCHES.strip().splitlines()
    base_only, skipping = ["nodes:"], False
    for line in lines[1:]:
        if not line.startswith("   "):
            skipping = line.split(":")[0].strip() not in keep
        if not skipping:
            base_only.append(line.replace("prefix: base", "prefix: alone"))
    path.write_text("\n".join(base_only) + "\n")
    reset_loads()
    assert run(world, path, cache=False).rc == 0
    assert np.array_equal(pixels(world.output / "alone_00001_.png"), base)


@pytest.mark.slow
def test_a_lora_patched_unet_gets_its_own_fast_path_after_its_base_had_one(world):
    ref = FileRef.of(world.checkpoint)
    lora = FileRef.of(world.models / "loras" / "detail.safetensors")
    base = models.unet_for(ModelRecipe(ref))
    base_fast = models.fast_unet(base)  # the base ran first (e.g. a strength-0 variation of a sweep)
    patched = models.unet_for(ModelRecipe(ref).with_lora(lora, 1.0))
    fast = models.fast_unet(patched)
    assert patched is not base and fast is not base_fast and fast.unet is patched
    assert models.fast_unet(base) is base_fast and models.fast_unet(patched) is fast  # each kept


def test_clip_encode_and_clip_skip(world):
    from nodes.conditioning import CLIPEncode, CLIPSetLastLayer

    ctx = Ctx(Folders(world.models, world.input, world.output))
    clip = ClipRecipe(FileRef.of(world.checkpoint))
    last = CLIPEncode(clip, "a (red:1.3) fox", ctx=ctx)
    penultimate = CLIPEncode(CLIPSetLastLayer(clip, -2), "a (red:1.3) fox", ctx=ctx)
    assert last.cond.shape[:2] == (1, 77) and last.pooled.shape[0] == 1
    assert not np.array_equal(np.array(last.cond), np.array(penultimate.cond))
    assert np.array_equal(np.array(last.pooled), np.array(penultimate.pooled))  # pooled: always the last
    long = CLIPEncode(clip, " ".join(["fox"] * 100), ctx=ctx)
    assert long.cond.shape[1] == 154  # two chunks of 77
    assert CLIPEncode(clip, "", ctx=ctx).cond.shape[1] == 77
    with pytest.raises(Exception, match="clip_skip must be between"):
        CLIPEncode(CLIPSetLastLayer(clip, -24), "a fox", ctx=ctx)  # the tiny encoder has fewer layers
