"""VAEDecodeTiled / VAEEncodeTiled against ComfyUI's formula: `comfy.utils.tiled_scale` and
`VAE.decode_tiled_` / `encode_tiled_` transcribed in torch below, run with diffusers' AutoencoderKL on the
same random weights as our VAE (fp32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from comfy_image_reference import tiled_scale_multidim
from reference import diffusers_vae
from safetensors.numpy import save_file

from graph import Folders
from nodes.vae_tiled import VAEDecodeTiled, VAEEncodeTiled
from nodes.values import FileRef, VaeRecipe
from sd.image.tiled_scale import tiled_scale
from sd.synthetic.vae import TINY_VAE, random_vae_weights

TOLERANCE = 1e-4


# --- ComfyUI's tiling, transcribed (comfy/utils.py tiled_scale_multidim for 2-D, comfy/sd.py VAE) ----------

def comfy_tiled_scale(samples, function, tile_x, tile_y, overlap, upscale_amount, out_channels):
    return tiled_scale_multidim(samples, function, (tile_y, tile_x), overlap, upscale_amount, out_channels)


def comfy_decode_tiled(vae, samples, tile_size, overlap):
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    tile_x = tile_y = tile_size // 8
    overlap //= 8
    fn = lambda a: vae.decode(a).sample.float()  # noqa: E731
    out = (comfy_tiled_scale(samples, fn, tile_x // 2, tile_y * 2, overlap, 8, 3)
           + comfy_tiled_scale(samples, fn, tile_x * 2, tile_y // 2, overlap, 8, 3)
           + comfy_tiled_scale(samples, fn, tile_x, tile_y, overlap, 8, 3)) / 3.0
    return torch.clamp((out + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)


def comfy_encode_tiled(vae, pixels, tile_size, overlap):
    pixels = pixels.movedim(-1, 1)
    fn = lambda a: vae.encode(a * 2.0 - 1.0).latent_dist.mode().float()  # noqa: E731
    samples = comfy_tiled_scale(pixels, fn, tile_size, tile_size, overlap, 1 / 8, 4)
    samples += comfy_tiled_scale(pixels, fn, tile_size * 2, tile_size // 2, overlap, 1 / 8, 4)
    samples += comfy_tiled_scale(pixels, fn, tile_size // 2, tile_size * 2, overlap, 1 / 8, 4)
    return samples / 3.0


# --- the tests --------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, folders):
        self.folders = folders
        self.messages: list[str] = []

    def log(self, msg: str) -> None:
        self.messages.append(msg)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    weights = random_vae_weights(TINY_VAE, np.random.default_rng(21))
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file(weights, str(path))
    reference = diffusers_vae(TINY_VAE, {k: torch.from_numpy(v) for k, v in weights.items()})
    return path, reference


@pytest.fixture(autouse=True)
def plain_fp32(monkeypatch):
    monkeypatch.setenv("SDGRAPH_FAST", "0")  # the plain modules, fp32 on the CPU


def _max_rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tiled_scale_matches_comfyui_on_a_tile_dependent_function():
    """A function whose result depends on the whole tile (its mean), so each tile's placement and blend
    weights show; odd sizes leave shorter last tiles. Per sample, as ComfyUI runs one sample at a time."""
    x = np.random.default_rng(0).standard_normal((2, 3, 29, 37)).astype(np.float32)

    def torch_fn(a):
        up = torch.nn.functional.interpolate(a, scale_factor=2, mode="nearest")
        return up + a.mean(dim=(1, 2, 3), keepdim=True)

    def mlx_fn(a):
        return mx.repeat(mx.repeat(a, 2, axis=1), 2, axis=2) + a.mean(axis=(1, 2, 3), keepdims=True)

    for tile_x, tile_y, overlap in ((12, 9, 3), (16, 16, 4), (40, 8, 2), (7, 30, 0)):
        want = comfy_tiled_scale(torch.from_numpy(x), torch_fn, tile_x, tile_y, overlap, 2, 3).numpy()
        got = np.array(tiled_scale(mlx_fn, mx.array(x.transpose(0, 2, 3, 1)), tile_y, tile_x, overlap, 2, 3))
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tile_size,overlap", [(64, 16), (96, 64)])  # the second lowers overlap to 24
def test_vae_decode_tiled_matches_comfyui(vae_file, tile_size, overlap):
    path, reference = vae_file
    latent = np.random.default_rng(1).standard_normal((1, 4, 14, 11)).astype(np.float32)
    with torch.no_grad():
        want = comfy_decode_tiled(reference, torch.from_numpy(latent), tile_size, overlap).numpy()
    from nodes.values import Latent

    recipe = VaeRecipe(FileRef.of(path), source="vae_file")
    got = np.array(VAEDecodeTiled(Latent(mx.array(latent.transpose(0, 2, 3, 1))), recipe, tile_size, overlap,
                                  ctx=Ctx(Folders())))
    assert got.shape == want.shape == (1, 112, 88, 3)
    assert _max_rel(got, want) <= TOLERANCE


@pytest.mark.slow
def test_vae_encode_tiled_matches_comfyui(vae_file):
    path, reference = vae_file
    pixels = np.random.default_rng(2).random((1, 100, 76, 3), dtype=np.float32)  # 100 -> cropped to 96
    cropped = pixels[:, 2:98, 2:74, :]
    with torch.no_grad():
        want = comfy_encode_tiled(reference, torch.from_numpy(cropped), 64, 16).numpy()
    recipe = VaeRecipe(FileRef.of(path), source="vae_file")
    got = VAEEncodeTiled(mx.array(pixels), recipe, 64, 16, ctx=Ctx(Folders())).samples
    got = np.array(got).transpose(0, 3, 1, 2)
    assert got.shape == want.shape == (1, 4, 12, 9)
    assert _max_rel(got, want) <= TOLERANCE


@pytest.mark.slow
def test_encode_overlap_must_leave_room(vae_file):
    recipe = VaeRecipe(FileRef.of(vae_file[0]), source="vae_file")
    with pytest.raises(ValueError, match="smaller than half"):
        VAEEncodeTiled(mx.zeros((1, 64, 64, 3)), recipe, 64, 32, ctx=Ctx(Folders()))
