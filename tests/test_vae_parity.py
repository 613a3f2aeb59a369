"""VAE encode/decode against diffusers' AutoencoderKL built from the same real-layout file (fp32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from component_loading import VAE_PREFIX, load_component, write_component
from reference import diffusers_vae, read_state
from sd15_keys import sd15_shapes

from sd.models.vae import AutoencoderKL, VAEConfig, vae_config_from_weights
from sd.synthetic.vae import SD15_VAE, TINY_VAE, random_vae_weights

TOLERANCE = 1e-4


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference_vae(path, cfg: VAEConfig):
    return diffusers_vae(cfg, read_state(path))


@pytest.fixture(scope="module", params=["safetensors", pytest.param("ckpt", marks=pytest.mark.slow)])
def vae_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / f"tiny_vae.{request.param}"
    write_component(path, VAE_PREFIX, random_vae_weights(TINY_VAE, np.random.default_rng(1)))
    ours = load_component(path, "vae")
    assert isinstance(ours, AutoencoderKL) and ours.config == TINY_VAE
    return ours, reference_vae(path, TINY_VAE)


def test_config_detected_from_shapes():
    weights = random_vae_weights(TINY_VAE, np.random.default_rng(0))
    assert vae_config_from_weights({k: v.shape for k, v in weights.items()}) == TINY_VAE


def test_sd15_shapes_give_sd15_config():
    shapes = sd15_shapes(VAE_PREFIX)
    assert vae_config_from_weights(shapes) == SD15_VAE
    # the tiny generator shares SD1.5's structure, so it must write exactly the real key set
    assert random_vae_weights(TINY_VAE, np.random.default_rng(0)).keys() == shapes.keys()


@pytest.mark.slow
def test_encode_matches_diffusers(vae_pair):
    ours, ref = vae_pair
    image = np.random.default_rng(2).uniform(-1, 1, (2, 3, 48, 32)).astype(np.float32)  # NCHW, non-square
    with torch.no_grad():
        expected = ref.encode(torch.from_numpy(image)).latent_dist.mode().numpy()
    got = np.array(ours.encode(mx.array(image.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert got.shape == expected.shape == (2, 4, 6, 4)
    err = max_rel_err(got, expected)
    print(f"VAE encode max relative error: {err:.2e}")
    assert err <= TOLERANCE


def test_decode_matches_diffusers(vae_pair):
    ours, ref = vae_pair
    latent = np.random.default_rng(3).standard_normal((2, 4, 5, 4)).astype(np.float32)
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(latent)).sample.numpy()
    got = np.array(ours.decode(mx.array(latent.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert got.shape == expected.shape == (2, 3, 40, 32)
    err = max_rel_err(got, expected)
    print(f"VAE decode max relative error: {err:.2e}")
    assert err <= TOLERANCE


@pytest.mark.slow
def test_decode_fp16_vs_fp32(vae_pair):
    """Not a parity check: records how far fp16 drifts from fp32 on the tiny decoder (see report)."""
    ours, _ = vae_pair
    latent = mx.array(np.random.default_rng(4).standard_normal((1, 8, 8, 4)).astype(np.float32))
    ref = np.array(ours.decode(latent))
    half = AutoencoderKL(ours.config)
    half.update(ours.parameters())
    half.set_dtype(mx.float16)
    got = np.array(half.decode(latent.astype(mx.float16)).astype(mx.float32))
    err = max_rel_err(got, ref)
    print(f"VAE decode fp16 vs fp32 max relative difference: {err:.2e}")
    assert np.isfinite(got).all() and err < 5e-2
