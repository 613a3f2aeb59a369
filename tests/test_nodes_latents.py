"""Latent nodes: resize methods match torch's interpolate (ComfyUI's upscale), LatentUpscale's size rules,
EmptyLatent's shape, VAEEncode's crop to multiples of 8."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from nodes.latents import EmptyLatent, Int8, LatentUpscale
from nodes.values import Latent
from sd.image.resize import center_crop_to_aspect, resize

TORCH_MODE = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}


@pytest.mark.parametrize("method", sorted(TORCH_MODE))
@pytest.mark.parametrize("size", [(12, 20), (5, 7), (8, 8)])
def test_resize_matches_torch_interpolate(method, size):
    x = np.random.default_rng(1).standard_normal((2, 8, 10, 4)).astype(np.float32)
    ours = np.array(resize(mx.array(x), *size, method))
    kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                          mode=TORCH_MODE[method], **kwargs).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_latent_upscale_size_rules():
    latent = Latent(mx.ones((1, 8, 16, 4)), batch_index=(0,))
    assert LatentUpscale(latent, "bilinear", 0, 0, "disabled") is latent
    assert LatentUpscale(latent, "bilinear", 256, 256, "disabled").samples.shape == (1, 32, 32, 4)
    # one side 0: from the aspect ratio (latent 16 wide x 8 high -> twice as wide)
    assert LatentUpscale(latent, "bilinear", 0, 128, "disabled").samples.shape == (1, 16, 32, 4)
    assert LatentUpscale(latent, "area", 256, 0, "disabled").samples.shape == (1, 16, 32, 4)
    assert LatentUpscale(latent, "bilinear", 16, 16, "disabled").samples.shape == (1, 8, 8, 4)  # min 64 px
    assert LatentUpscale(latent, "nearest-exact", 64, 64, "center").batch_index == (0,)


def test_center_crop_keeps_the_middle():
    x = mx.array(np.arange(8 * 16).reshape(1, 8, 16, 1).astype(np.float32))
    crop = np.array(center_crop_to_aspect(x, 64, 64))
    assert crop.shape == (1, 8, 8, 1) and crop[0, 0, 0, 0] == 4


def test_empty_latent_and_multiple_of_8_inputs():
    assert EmptyLatent(64, 128, 3).samples.shape == (3, 16, 8, 4)
    assert Int8(16, 1024).check(512) == 512
    with pytest.raises(ValueError, match="not a multiple of 8"):
        Int8(16, 1024).check(100)
    assert Int8(0, 64).json_schema() == {"type": "integer", "minimum": 0, "maximum": 64, "multipleOf": 8}
