"""The UNet's per-call extras (sd/models/unet_extras.py): control residuals against diffusers' own
`down_block_additional_residuals` / `mid_block_additional_residual`, concat channels, attention and block
patches, and the accelerated FastUNet taking the same extras as the plain forward."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import diffusers_unet, read_state

from sd.accel.compiled import FastUNet
from sd.accel.ops import FastOptions
from sd.loading.checkpoint import load_checkpoint
from sd.models.ops import PLAIN
from sd.models.unet import UNetModel
from sd.models.unet_extras import ControlResiduals, UNetExtras
from sd.synthetic import make_checkpoint
from sd.synthetic.unet import TINY_UNET


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("extras") / "tiny.safetensors", seed=4, parts=("unet",))
    return path, load_checkpoint(path, dtype="float32", parts=("unet",))


def _inputs(rng, batch=1, h=8, w=12):
    x = rng.standard_normal((batch, h, w, 4)).astype(np.float32)
    return mx.array(x), mx.array(np.full((batch,), 400.0, np.float32)), mx.array(
        rng.standard_normal((batch, 77, 64)).astype(np.float32))


def _skip_shapes(unet, x, t, c):
    """Shapes of the 12 skips and the middle output, read through a recording patch."""
    shapes = {}

    def record(h, skip, site):
        shapes[site.index] = skip.shape
        return h, skip

    unet(x, t, c, extras=UNetExtras(output_block_patch=(record,)))
    n = len(shapes)
    return [shapes[n - 1 - i] for i in range(n)]


@pytest.mark.slow  # ~10 s, most of it importing diffusers
def test_control_residuals_match_diffusers_additional_residuals(tiny):
    path, ckpt = tiny
    rng = np.random.default_rng(0)
    x, t, c = _inputs(rng)
    skips = _skip_shapes(ckpt.unet, x, t, c)
    residuals = [rng.standard_normal(s).astype(np.float32) * 0.5 for s in skips]
    middle_shape = (1, 1, 2, skips[-1][3])  # 8x12 latent -> 1x2 after three downsamples
    middle = rng.standard_normal(middle_shape).astype(np.float32) * 0.5
    control = ControlResiduals(output=[mx.array(r) for r in residuals], middle=mx.array(middle))
    ours = np.array(ckpt.unet(x, t, c, extras=UNetExtras(control=control))).transpose(0, 3, 1, 2)

    model = diffusers_unet(ckpt.unet_config, read_state(path))
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        want = model(nchw(np.array(x)), torch.from_numpy(np.array(t)), encoder_hidden_states=torch.from_numpy(
            np.array(c)), down_block_additional_residuals=tuple(nchw(r) for r in residuals),
            mid_block_additional_residual=nchw(middle)).sample.numpy()
        plain = model(nchw(np.array(x)), torch.from_numpy(np.array(t)),
                      encoder_hidden_states=torch.from_numpy(np.array(c))).sample.numpy()
    assert np.abs(want - plain).max() > 1e-2  # the residuals matter
    assert np.abs(ours - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.slow
def test_input_control_feeds_the_following_blocks(tiny):
    """control.input[i] changes what block i+1 sees (T2I-adapter style), unlike control.output[i]."""
    _, ckpt = tiny
    rng = np.random.default_rng(1)
    x, t, c = _inputs(rng)
    skips = _skip_shapes(ckpt.unet, x, t, c)
    r = mx.array(rng.standard_normal(skips[1]).astype(np.float32))
    a = ckpt.unet(x, t, c, extras=UNetExtras(control=ControlResiduals(input=[None, r])))
    b = ckpt.unet(x, t, c, extras=UNetExtras(control=ControlResiduals(output=[None, r])))
    assert float(mx.abs(a - b).max()) > 1e-3


@pytest.mark.slow
def test_concat_channels_are_appended_to_x():
    rng = np.random.default_rng(2)
    unet = UNetModel(replace(TINY_UNET, in_channels=9))
    x, t, c = _inputs(rng)
    extra = mx.array(rng.standard_normal((1, 8, 12, 5)).astype(np.float32))
    got = unet(x, t, c, extras=UNetExtras(concat=extra))
    want = unet(mx.concatenate([x, extra], axis=-1), t, c)[..., :4]
    assert np.array_equal(np.array(got), np.array(want))


def test_attention_replacement_at_one_site(tiny):
    _, ckpt = tiny
    rng = np.random.default_rng(3)
    x, t, c = _inputs(rng)
    plain = np.array(ckpt.unet(x, t, c))
    same = ckpt.unet(x, t, c, extras=UNetExtras(attn1_replace={("middle", 0, 0): PLAIN.attention}))
    assert np.array_equal(np.array(same), plain)
    seen = []

    def identity(q, k, v, heads, scale):  # PAG's perturbed attention
        seen.append(q.shape)
        return v

    perturbed = ckpt.unet(x, t, c, extras=UNetExtras(attn1_replace={("middle", 0): identity}))
    assert len(seen) == 1 and float(np.abs(np.array(perturbed) - plain).max()) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("compiles", [True, False])
def test_fast_unet_takes_the_same_extras(tiny, compiles):
    _, ckpt = tiny
    rng = np.random.default_rng(5)
    x, t, c = _inputs(rng, batch=2)
    skips = _skip_shapes(ckpt.unet, x, t, c)
    control = ControlResiduals(output=[None] * 3 + [mx.array(rng.standard_normal(s).astype(np.float32))
                                                     for s in skips[3:]])
    fast = FastUNet(ckpt.unet, FastOptions(compile=compiles, fused_qkv=True, shared_projections=True))
    for extras in (UNetExtras(control=control),
                   UNetExtras(attn1_replace={("input", 1): lambda q, k, v, heads, scale: v})):
        want = np.array(ckpt.unet(x, t, c, extras=extras))
        got = np.array(fast(x, t, c, extras))
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert np.array_equal(np.array(fast(x, t, c)), np.array(fast(x, t, c, UNetExtras())))
