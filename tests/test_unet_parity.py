"""UNet parity: our MLX UNet, loaded through load_checkpoint, against diffusers built from the same file.

diffusers' `convert_ldm_unet_checkpoint` is an independent LDM -> module key mapping, and torch reads the
files on the reference side, so neither our reader nor our naming is trusted by the reference.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from reference import diffusers_unet, read_state
from safetensors.torch import load_file

from sd.loading.checkpoint import load_checkpoint
from sd.models.unet import timestep_embedding
from sd.synthetic import make_checkpoint

MAX_REL_ERR = 1e-4




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
    reference_model = diffusers_unet(ckpt.unet_config, read_state(path))
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(x), torch.from_numpy(t),
                                    encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    assert np.abs(reference).max() > 0.1  # the reference must do something for the bound to mean anything
    return relative_error(ours, reference)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", pytest.param("ckpt", marks=pytest.mark.slow)])
def test_unet_matches_diffusers(tmp_path, inputs, fmt):
    path = make_checkpoint(tmp_path / f"tiny.{fmt}", seed=1)
    err = _run_both(path, inputs)
    print(f"\nUNet max relative error vs diffusers ({fmt}, our writer): {err:.2e}")
    assert err <= MAX_REL_ERR


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
