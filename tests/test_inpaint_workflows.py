"""The inpainting examples run after `sdgraph demo`: inpaint.yaml (InpaintModelConditioning + the 9-channel
checkpoint; the unmasked region comes back: exactly in latent space, within the VAE's round trip in pixels),
the same with an ordinary checkpoint and with VAEEncodeForInpaint, outpaint.yaml, and DifferentialDiffusion
in a graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from sd_nodes_testing import WORKFLOWS, make_world, pixels, run

from sd.io.checkpoint_io import open_tensors

STEPS = ["--set", "steps=2"]


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


def _with_latents_saved(tmp_path, changes=None):
    """inpaint.yaml plus SaveLatent of the sampler's input and output latents."""
    data = yaml.safe_load((WORKFLOWS / "inpaint.yaml").read_text())
    data["nodes"]["save_in"] = {"type": "SaveLatent", "samples": {"from": "inpaint.latent"},
                                "filename_prefix": "latents/in"}
    data["nodes"]["save_out"] = {"type": "SaveLatent", "samples": {"from": "sampler.LATENT"},
                                 "filename_prefix": "latents/out"}
    for name, node in (changes or {}).items():  # new nodes, or inputs of existing ones changed
        data["nodes"][name] = {**data["nodes"].get(name, {}), **node}
    path = tmp_path / "inpaint_latents.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _latent(path) -> np.ndarray:
    return np.array(open_tensors(path)["latent_tensor"])


def _roundtrip(world, tmp_path, ckpt="sd-v1-5-inpainting.safetensors"):
    path = tmp_path / "roundtrip.yaml"
    path.write_text(yaml.safe_dump({"nodes": {
        "ckpt": {"type": "CheckpointLoaderSimple", "ckpt_name": ckpt},
        "load": {"type": "LoadImage", "image": "example.png"},
        "enc": {"type": "VAEEncode", "pixels": {"from": "load.IMAGE"}, "vae": {"from": "ckpt.VAE"}},
        "dec": {"type": "VAEDecode", "samples": {"from": "enc.LATENT"}, "vae": {"from": "ckpt.VAE"}},
        "save": {"type": "SaveImage", "images": {"from": "dec.IMAGE"}, "filename_prefix": "roundtrip"}}}))
    assert run(world, path).rc == 0
    return pixels(world.output / "roundtrip_00001_.png").astype(int)


def _latent_keep(world, latent_hw) -> np.ndarray:
    """Where ComfyUI's prepare_mask makes the mask 0 at the latent's size (from the mask file, in torch)."""
    mask = np.asarray(Image.open(world.input / "example_mask.png").convert("RGB"))[..., 0] / 255.0
    m = F.interpolate(torch.tensor(mask, dtype=torch.float32)[None, None], size=latent_hw, mode="bilinear")
    return m[0, 0].numpy() == 0


@pytest.mark.slow
def test_inpaint_workflow_keeps_the_unmasked_region(world, tmp_path):
    result = run(world, _with_latents_saved(tmp_path), *STEPS)
    assert result.rc == 0, result.err
    before = _latent(world.output / "latents" / "in_00001_.latent")
    after = _latent(world.output / "latents" / "out_00001_.latent")
    keep = _latent_keep(world, before.shape[2:])
    assert keep.any() and (~keep).any()
    np.testing.assert_allclose(after[:, :, keep], before[:, :, keep], atol=1e-6)  # exactly re-imposed
    assert np.abs(after[:, :, ~keep] - before[:, :, ~keep]).max() > 1e-2  # and the masked part repainted
    # in pixels, the unmasked region is within the VAE's round trip of the input (with random weights that
    # round trip is itself far from the input: the latent check above is the one that bites)
    image = np.asarray(Image.open(world.input / "example.png").convert("RGB")).astype(int)
    out = pixels(world.output / "inpaint_00001_.png").astype(int)
    mask = np.asarray(Image.open(world.input / "example_mask.png").convert("RGB"))[..., 0] == 0
    roundtrip = _roundtrip(world, tmp_path)
    assert np.abs(out - image)[mask].max() <= np.abs(roundtrip - image)[mask].max() + 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ordinary_checkpoint", "vae_encode_for_inpaint", "differential"])
def test_inpaint_variants_keep_the_unmasked_region(world, tmp_path, variant):
    changes, extra = {}, []
    if variant == "ordinary_checkpoint":  # 4 channels: the concat entries are ignored, the noise mask kept
        extra = ["--set", "ckpt=v1-5-pruned-emaonly.safetensors"]
    elif variant == "vae_encode_for_inpaint":
        changes["inpaint_encode"] = {"type": "VAEEncodeForInpaint", "pixels": {"from": "load.IMAGE"},
                                     "vae": {"from": "ckpt.VAE"}, "mask": {"from": "mask.MASK"},
                                     "grow_mask_by": 0}
        changes["sampler"] = {"latent_image": {"from": "inpaint_encode.LATENT"},
                              "positive": {"from": "positive.CONDITIONING"},
                              "negative": {"from": "negative.CONDITIONING"}}
        changes["save_in"] = {"samples": {"from": "inpaint_encode.LATENT"}}
    else:  # DifferentialDiffusion keeps the mask's zeros until its threshold reaches 0 (the last step)
        changes["dd"] = {"type": "DifferentialDiffusion", "model": {"from": "ckpt.MODEL"}}
        changes["sampler"] = {"model": {"from": "dd.MODEL"}}
        extra = ["--set", "denoise=0.5"]
    result = run(world, _with_latents_saved(tmp_path, changes), *STEPS, *extra)
    assert result.rc == 0, result.err
    before = _latent(world.output / "latents" / "in_00001_.latent")
    after = _latent(world.output / "latents" / "out_00001_.latent")
    keep = _latent_keep(world, before.shape[2:])
    assert np.abs(after[:, :, ~keep] - before[:, :, ~keep]).max() > 1e-2
    if variant != "differential":
        np.testing.assert_allclose(after[:, :, keep], before[:, :, keep], atol=1e-6)


@pytest.mark.slow
def test_outpaint_workflow_runs(world):
    result = run(world, WORKFLOWS / "outpaint.yaml", *STEPS, "--set", "left=16", "--set", "right=8")
    assert result.rc == 0, result.err
    out = pixels(world.output / "outpaint_00001_.png")
    assert out.shape[:2] == (64, 64 + 24)


@pytest.mark.slow
def test_inpainting_checkpoint_without_a_mask_runs_txt2img(world):
    """No mask anywhere: the 9-channel UNet gets ComfyUI's ones and mid-grey latent (test_inpaint_inputs)."""
    result = run(world, WORKFLOWS / "txt2img.yaml", "--set", "ckpt=sd-v1-5-inpainting.safetensors",
                 "--set", "width=64", "--set", "height=64", "--set", "steps=2")
    assert result.rc == 0, result.err


COMFY_API = {
    '1': {'class_type': 'CheckpointLoaderSimple', 'inputs': {'ckpt_name': 'sd-v1-5-inpainting.safetensors'}},
    '2': {'class_type': 'LoadImage', 'inputs': {'image': 'example.png'}},
    '3': {'class_type': 'LoadImageMask', 'inputs': {'image': 'example_mask.png', 'channel': 'red'}},
    '4': {'class_type': 'CLIPTextEncode', 'inputs': {'clip': ['1', 1], 'text': 'a cat'}},
    '5': {'class_type': 'CLIPTextEncode', 'inputs': {'clip': ['1', 1], 'text': ''}},
    '6': {'class_type': 'InpaintModelConditioning',
          'inputs': {'positive': ['4', 0], 'negative': ['5', 0], 'vae': ['1', 2], 'pixels': ['2', 0],
                     'mask': ['3', 0], 'noise_mask': True}},
    '7': {'class_type': 'DifferentialDiffusion', 'inputs': {'model': ['1', 0]}},
    '8': {'class_type': 'KSampler',
          'inputs': {'model': ['7', 0], 'positive': ['6', 0], 'negative': ['6', 1], 'latent_image': ['6', 2],
                     'seed': 1, 'steps': 2, 'cfg': 7, 'sampler_name': 'euler', 'scheduler': 'normal',
                     'denoise': 1.0}},
    '9': {'class_type': 'VAEDecode', 'inputs': {'samples': ['8', 0], 'vae': ['1', 2]}},
    '10': {'class_type': 'SaveImage', 'inputs': {'images': ['9', 0], 'filename_prefix': 'ci'}},
}


@pytest.mark.slow
def test_comfyui_api_inpaint_workflow_imports_and_runs(world, tmp_path):
    """InpaintModelConditioning and DifferentialDiffusion (without the `strength` older ComfyUI lacks) by
    ComfyUI's class names, links by output index."""
    import json

    path = tmp_path / "inpaint_api.json"
    path.write_text(json.dumps(COMFY_API))
    result = run(world, path)
    assert result.rc == 0, result.err
    assert [p.name for p in world.pngs()] == ["ci_00001_.png"]


@pytest.mark.slow
def test_inpaint_nodes_equal_comfyui_around_the_vae(world):
    """VAEEncodeForInpaint and InpaintModelConditioning called as nodes: their latents are the VAE's encoding
    of the pixels ComfyUI's code (transcribed in torch, test_inpaint_inputs) hands to vae.encode, their masks
    ComfyUI's; on an image whose sides are not multiples of 8."""
    from types import SimpleNamespace

    import mlx.core as mx
    from test_inpaint_inputs import comfy_vae_encode_for_inpaint

    from nodes import models
    from nodes.inpaint import InpaintModelConditioning, VAEEncodeForInpaint
    from nodes.values import Conditioning, FileRef, VaeRecipe
    from sd.image.codec import encode_image

    ctx = SimpleNamespace(log=lambda msg: None)
    vae = VaeRecipe(FileRef.of(world.models / "checkpoints" / "sd-v1-5-inpainting.safetensors"))
    model = models.vae_for(vae)
    rng = np.random.default_rng(8)
    pixels = rng.random((1, 43, 61, 3)).astype(np.float32)
    mask = (rng.random((1, 24, 32)) > 0.6).astype(np.float32)
    image, m = mx.array(pixels), mx.array(mask)
    filled, noise_mask, resized = comfy_vae_encode_for_inpaint(torch.from_numpy(pixels),
                                                               torch.from_numpy(mask), 6)
    expected = np.array(encode_image(model, mx.array(filled.numpy())))

    latent = VAEEncodeForInpaint(image, vae, m, 6, ctx=ctx)
    np.testing.assert_allclose(np.array(latent.samples), expected, atol=1e-5)
    np.testing.assert_array_equal(np.array(latent.noise_mask), noise_mask.numpy()[:, 0])

    cond = Conditioning(mx.zeros((1, 77, 64)))
    positive, negative, out = InpaintModelConditioning(cond, cond, vae, image, m, True, ctx=ctx)
    for c in (positive, negative):
        [entry] = list(c)
        np.testing.assert_allclose(np.array(entry.options["concat_latent_image"]), expected, atol=1e-5)
        np.testing.assert_allclose(np.array(entry.options["concat_mask"]), resized.numpy()[:, 0], atol=1e-5)
    whole = np.array(encode_image(model, mx.array(pixels)))  # ComfyUI's VAE.encode crops the same, centred
    np.testing.assert_allclose(np.array(out.samples), whole, atol=1e-5)
    np.testing.assert_allclose(np.array(out.noise_mask), resized.numpy()[:, 0], atol=1e-5)
    _, _, no_mask = InpaintModelConditioning(cond, cond, vae, image, m, False, ctx=ctx)
    assert no_mask.noise_mask is None
