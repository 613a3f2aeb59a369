"""UNet parity: our MLX UNet, loaded through load_checkpoint, against diffusers built from the same file.

diffusers' `convert_ldm_unet_checkpoint` is an independent LDM -> module key mapping, and torch reads the
files on the reference side, so neither our reader nor our naming is trusted by the reference.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file

from sd.checkpoint import load_checkpoint
from sd.synthetic import make_checkpoint
from sd.unet import UNetConfig, timestep_embedding

MAX_REL_ERR = 1e-4


def diffusers_unet(cfg: UNetConfig, state_dict: dict) -> UNet2DConditionModel:
    """A diffusers UNet mirroring our detected config, filled from the LDM state dict by diffusers."""
    levels = range(len(cfg.channel_mult))
    model = UNet2DConditionModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(m * cfg.model_channels for m in cfg.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D"
                               for lv in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if lv in cfg.attention_levels else "UpBlock2D"
                             for lv in reversed(levels)),
        layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=cfg.transformer_depth,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' SD1 configs put the head *count* here
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
        use_linear_projection=False,
    )
    converted = convert_ldm_unet_checkpoint(state_dict, model.config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def torch_state_dict(path) -> dict:
    if str(path).endswith(".safetensors"):
        return load_file(path)
    loaded = torch.load(path, weights_only=True)
    return loaded.get("state_dict", loaded)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)  # NCHW, non-square to catch H/W mix-ups
    t = np.array([3.0, 721.0], dtype=np.float32)
    context = rng.standard_normal((2, 77, 64)).astype(np.float32)
    return x, t, context


def _run_both(path, inputs) -> float:
    x, t, context = inputs
    ckpt = load_checkpoint(path, dtype="float32", parts=("unet",))
    ours = ckpt.unet(mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(context))
    ours = np.array(ours).transpose(0, 3, 1, 2)
    reference_model = diffusers_unet(ckpt.unet_config, torch_state_dict(path))
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(x), torch.from_numpy(t),
                                    encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    assert np.abs(reference).max() > 0.1  # the reference must do something for the bound to mean anything
    return relative_error(ours, reference)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_unet_matches_diffusers(tmp_path, inputs, fmt):
    path = make_checkpoint(tmp_path / f"tiny.{fmt}", seed=1)
    err = _run_both(path, inputs)
    print(f"\nUNet max relative error vs diffusers ({fmt}, our writer): {err:.2e}")
    assert err <= MAX_REL_ERR


def test_unet_matches_diffusers_torch_saved_ckpt(tmp_path, inputs):
    """A .ckpt written by torch.save itself, with the Lightning-style wrapper real files have."""
    source = make_checkpoint(tmp_path / "source.safetensors", seed=2)
    path = tmp_path / "torch_saved.ckpt"
    torch.save({"state_dict": load_file(source), "global_step": 1234, "epoch": 5}, path)
    err = _run_both(path, inputs)
    print(f"\nUNet max relative error vs diffusers (torch.save .ckpt): {err:.2e}")
    assert err <= MAX_REL_ERR


def test_timestep_embedding_matches_diffusers():
    t = np.array([0.0, 1.0, 37.0, 999.0], dtype=np.float32)
    ours = np.array(timestep_embedding(mx.array(t), 320))
    reference = get_timestep_embedding(torch.from_numpy(t), 320, flip_sin_to_cos=True,
                                       downscale_freq_shift=0).numpy()
    # at t~1000 the argument itself has an fp32 ulp of 6e-5, so exp() implementations differ by that much
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_fp16_compute_stays_close(tmp_path, inputs):
    """fp16 weights and activations (the GPU default) run and stay near the fp32 result."""
    x, t, context = inputs
    path = make_checkpoint(tmp_path / "tiny.safetensors", seed=3, parts=("unet",))
    args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(context))
    full = np.array(load_checkpoint(path, dtype="float32").unet(*args))
    half_model = load_checkpoint(path, dtype="float16").unet
    assert half_model.input_blocks[1][0].in_layers[2].weight.dtype == mx.float16
    half = half_model(*args)
    assert half.dtype == mx.float32  # output comes back in the input's dtype
    err = relative_error(np.array(half), full)
    print(f"\nUNet fp16 vs fp32 max relative error: {err:.2e}")
    assert err < 2e-2


def test_odd_latent_sides_match_diffusers(tmp_path):
    """Latent sides that do not halve evenly at every level (e.g. 96x80 px -> 12x10): the upsamplers resize to
    the skip connection's size, as diffusers (upsample_size) and ComfyUI (output_shape) do."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 4, 12, 10)).astype(np.float32)
    t = np.array([500.0], dtype=np.float32)
    context = rng.standard_normal((1, 77, 64)).astype(np.float32)
    path = make_checkpoint(tmp_path / "tiny.safetensors", seed=3)
    err = _run_both(path, (x, t, context))
    print(f"\nUNet max relative error vs diffusers (12x10 latent): {err:.2e}")
    assert err <= MAX_REL_ERR
