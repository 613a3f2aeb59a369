"""Canny (sd/image/canny.py) against kornia's canny, which ComfyUI's Canny node calls."""

from __future__ import annotations

import numpy as np
import pytest

from sd.image.canny import canny

kornia = pytest.importorskip("kornia")


def _image(seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:72, 0:96] / 48.0
    channels = [np.sin(3 * xx + yy), np.cos(5 * yy), (xx > 1) * 0.5 + 0.2 * np.sin(7 * xx * yy)]
    img = np.stack(channels, -1)[None]
    smooth = np.clip(0.5 + 0.4 * img + 0.05 * rng.standard_normal(img.shape), 0, 1)
    return np.concatenate([smooth, rng.uniform(size=img.shape)]).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("low,high", [(0.4, 0.8), (0.1, 0.2), (0.05, 0.9), (0.3, 0.3)])
def test_canny_equals_kornia(low, high):
    import torch

    img = _image()
    _, theirs = kornia.filters.canny(torch.from_numpy(img).permute(0, 3, 1, 2), low, high)
    ours = canny(img, low, high)
    assert ours.any()
    assert np.array_equal(ours, theirs[:, 0].numpy())


def test_canny_node_gives_three_channel_edges():
    import mlx.core as mx

    from nodes.controlnet import Canny

    out = Canny(mx.array(_image()), 0.4, 0.8)
    assert out.shape == (2, 72, 96, 3) and set(np.unique(np.array(out))) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="low_threshold"):
        Canny(mx.array(_image()), 0.9, 0.5)
