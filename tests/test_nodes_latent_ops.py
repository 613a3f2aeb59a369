"""Latent nodes (nodes/latent_ops.py) against torch transcriptions of ComfyUI's code on random NCHW latents:
LatentUpscaleBy (incl. bislerp) vs common_upscale, LatentComposite's feathering, LatentCompositeMasked vs
nodes_mask.composite, LatentBlend, LatentCrop, LatentFlip, LatentRotate vs torch, and the batch_index
bookkeeping of RepeatLatentBatch / LatentFromBatch as ComfyUI's dicts do it."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from comfy_image_reference import common_upscale, composite, nchw, nhwc, repeat_to_batch_size

from nodes.latent_ops import (
    LatentAdd,
    LatentBatch,
    LatentBatchSeedBehavior,
    LatentBlend,
    LatentComposite,
    LatentCompositeMasked,
    LatentCrop,
    LatentFlip,
    LatentFromBatch,
    LatentMultiply,
    LatentRotate,
    LatentSubtract,
    LatentUpscaleBy,
    RepeatLatentBatch,
)
from nodes.latents import LatentUpscale
from nodes.values import Latent

METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")


def latents(b=2, h=12, w=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, h, w, 4)).astype(np.float32)


def close(ours: Latent, ref: torch.Tensor, atol=1e-5):
    np.testing.assert_allclose(np.array(ours.samples), nhwc(ref), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale_by", [1.5, 0.6, 2.0, 1.0])
def test_latent_upscale_by_matches_common_upscale(method, scale_by):
    x = latents(h=10, w=14)
    ours = LatentUpscaleBy(Latent(mx.array(x), (3, 4)), method, scale_by)
    width, height = round(14 * scale_by), round(10 * scale_by)
    close(ours, common_upscale(nchw(x), width, height, method, "disabled"))
    assert ours.batch_index == (3, 4)


def test_bislerp_handles_zero_and_opposite_vectors():
    x = latents(1, 4, 4)
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = -x[0, 0, 2]  # opposite directions: the straight-lerp fallback
    x[0, 1, 1] = x[0, 1, 2]   # equal: kept
    ours = LatentUpscale(Latent(mx.array(x)), "bislerp", 64, 72, "center")
    close(ours, common_upscale(nchw(x), 8, 9, "bislerp", "center"))


def feather_reference(samples_to, samples_from, x, y, feather):
    """ComfyUI's LatentComposite.composite on NCHW (pixels in, // 8 inside)."""
    x, y, feather = x // 8, y // 8, feather // 8
    s = samples_to.clone()
    if feather == 0:
        s[:, :, y:y + samples_from.shape[2], x:x + samples_from.shape[3]] = \
            samples_from[:, :, :samples_to.shape[2] - y, :samples_to.shape[3] - x]
        return s
    samples_from = samples_from[:, :, :samples_to.shape[2] - y, :samples_to.shape[3] - x]
    mask = torch.ones_like(samples_from)
    for t in range(feather):
        if y != 0:
            mask[:, :, t:1 + t, :] *= ((1.0 / feather) * (t + 1))
        if y + samples_from.shape[2] < samples_to.shape[2]:
            mask[:, :, mask.shape[2] - 1 - t: mask.shape[2] - t, :] *= ((1.0 / feather) * (t + 1))
        if x != 0:
            mask[:, :, :, t:1 + t] *= ((1.0 / feather) * (t + 1))
        if x + samples_from.shape[3] < samples_to.shape[3]:
            mask[:, :, :, mask.shape[3] - 1 - t: mask.shape[3] - t] *= ((1.0 / feather) * (t + 1))
    rev = torch.ones_like(mask) - mask
    region = s[:, :, y:y + samples_from.shape[2], x:x + samples_from.shape[3]]
    s[:, :, y:y + samples_from.shape[2], x:x + samples_from.shape[3]] = samples_from * mask + region * rev
    return s


@pytest.mark.parametrize("x, y", [(0, 0), (16, 24), (64, 0), (100, 60), (120, 88)])
@pytest.mark.parametrize("feather", [0, 8, 16, 40])
@pytest.mark.parametrize("source", [(6, 7), (20, 30)])
def test_latent_composite_feathering_matches_comfyui(x, y, feather, source):
    to, frm = latents(2, 12, 16, 1), latents(1, *source, 2)
    ours = LatentComposite(Latent(mx.array(to), (0, 1)), Latent(mx.array(frm)), x, y, feather)
    close(ours, feather_reference(nchw(to), nchw(frm), x, y, feather), atol=2e-6)
    assert ours.batch_index == (0, 1)  # samples_to's fields are kept


@pytest.mark.parametrize("x, y", [(0, 0), (24, 40), (120, 88), (200, 200)])
@pytest.mark.parametrize("mask_shape", [None, (1, 48, 56), (2, 17, 23)])
@pytest.mark.parametrize("resize_source", [False, True])
def test_latent_composite_masked_matches_comfyui(x, y, mask_shape, resize_source):
    dest, src = latents(2, 12, 16, 1), latents(1, 6, 7, 2)
    mask = None if mask_shape is None else np.random.default_rng(5).random(mask_shape, dtype=np.float32)
    ours = LatentCompositeMasked(Latent(mx.array(dest)), Latent(mx.array(src)), x, y, resize_source,
                                 None if mask is None else mx.array(mask))
    ref = composite(nchw(dest), nchw(src), x, y, None if mask is None else torch.from_numpy(mask), 8,
                    resize_source)
    close(ours, ref)


@pytest.mark.parametrize("second", [(2, 12, 16), (2, 9, 20), (1, 12, 16)])
def test_latent_blend_matches_comfyui(second):
    a, b = latents(2, 12, 16, 1), latents(*second, 2)
    ours = LatentBlend(Latent(mx.array(a)), Latent(mx.array(b)), 0.3)
    s1, s2 = nchw(a), nchw(b)
    if s1.shape != s2.shape:
        s2 = common_upscale(s2, s1.shape[3], s1.shape[2], "bicubic", "center")
    close(ours, s1 * 0.3 + s2 * (1 - 0.3))


@pytest.mark.parametrize("window", [(64, 64, 0, 0), (80, 64, 16, 24), (512, 512, 0, 0), (64, 64, 900, 900),
                                    (72, 100, 40, 8)])
def test_latent_crop_matches_comfyui(window):
    width, height, x, y = window
    s = nchw(latents(2, 12, 16))
    x, y = x // 8, y // 8
    x, y = min(x, s.shape[3] - 8), min(y, s.shape[2] - 8)
    ref = s[:, :, y:y + height // 8, x:x + width // 8]
    close(LatentCrop(Latent(mx.array(nhwc(s))), *window), ref)


def test_flip_and_rotate_match_torch():
    x = latents(2, 6, 10)
    s = nchw(x)
    close(LatentFlip(Latent(mx.array(x)), "x-axis: vertically"), torch.flip(s, dims=[2]))
    close(LatentFlip(Latent(mx.array(x)), "y-axis: horizontally"), torch.flip(s, dims=[3]))
    for k, rotation in enumerate(["none", "90 degrees", "180 degrees", "270 degrees"]):
        close(LatentRotate(Latent(mx.array(x)), rotation), torch.rot90(s, k=k, dims=[3, 2]))
    turned = np.array(LatentRotate(Latent(mx.array(x)), "90 degrees").samples)
    assert turned.shape == (2, 10, 6, 4) and np.array_equal(turned[0, 0, -1], x[0, 0, 0])  # clockwise


def comfy_repeat(s: dict, amount: int) -> dict:
    """ComfyUI's RepeatLatentBatch.repeat on the fields that matter (samples, batch_index, noise_mask)."""
    out = dict(s)
    out["samples"] = s["samples"].repeat((amount, 1, 1, 1))
    if "noise_mask" in s and s["noise_mask"].shape[0] > 1:
        out["noise_mask"] = s["noise_mask"].repeat((amount, 1, 1, 1))
    if "batch_index" in out:
        offset = max(out["batch_index"]) - min(out["batch_index"]) + 1
        out["batch_index"] = out["batch_index"] + [x + (i * offset) for i in range(1, amount)
                                                   for x in out["batch_index"]]
    return out


def comfy_from_batch(s: dict, batch_index: int, length: int) -> dict:
    out = dict(s)
    s_in = s["samples"]
    batch_index = min(s_in.shape[0] - 1, batch_index)
    length = min(s_in.shape[0] - batch_index, length)
    out["samples"] = s_in[batch_index:batch_index + length]
    if "noise_mask" in s:
        masks = s["noise_mask"]
        if masks.shape[0] > 1:
            if masks.shape[0] < s_in.shape[0]:
                masks = masks.repeat(math.ceil(s_in.shape[0] / masks.shape[0]), 1, 1, 1)[:s_in.shape[0]]
            out["noise_mask"] = masks[batch_index:batch_index + length]
    if "batch_index" not in s:
        out["batch_index"] = list(range(batch_index, batch_index + length))
    else:
        out["batch_index"] = s["batch_index"][batch_index:batch_index + length]
    return out


def ours_and_comfy(b, index, mask_batch):
    x = latents(b, 4, 4)
    mask = None if mask_batch is None else np.random.default_rng(1).random((mask_batch, 1, 32, 32),
                                                                             dtype=np.float32)
    ours = Latent(mx.array(x), index, None if mask is None else mx.array(mask))
    comfy = {"samples": nchw(x)}
    if index is not None:
        comfy["batch_index"] = list(index)
    if mask is not None:
        comfy["noise_mask"] = torch.from_numpy(mask)
    return ours, comfy


def same(ours: Latent, comfy: dict):
    np.testing.assert_array_equal(np.array(ours.samples), nhwc(comfy["samples"]))
    assert ours.batch_index == (tuple(comfy["batch_index"]) if "batch_index" in comfy else None)
    if ours.noise_mask is None:
        assert "noise_mask" not in comfy
    else:
        np.testing.assert_array_equal(np.array(ours.noise_mask), comfy["noise_mask"].numpy())


@pytest.mark.parametrize("index", [None, (0, 1, 2), (4, 7, 5)])
@pytest.mark.parametrize("mask_batch", [None, 1, 3])
@pytest.mark.parametrize("amount", [1, 3])
def test_repeat_latent_batch_like_comfyui(index, mask_batch, amount):
    ours, comfy = ours_and_comfy(3, index, mask_batch)
    same(RepeatLatentBatch(ours, amount), comfy_repeat(comfy, amount))


@pytest.mark.parametrize("index", [None, (10, 11, 12, 13)])
@pytest.mark.parametrize("mask_batch", [None, 1, 2, 4])
@pytest.mark.parametrize("start, length", [(0, 1), (1, 2), (2, 64), (63, 1)])
def test_latent_from_batch_like_comfyui(index, mask_batch, start, length):
    ours, comfy = ours_and_comfy(4, index, mask_batch)
    same(LatentFromBatch(ours, start, length), comfy_from_batch(comfy, start, length))


def test_from_batch_of_a_repeat_keeps_each_copys_noise_position():
    one = Latent(mx.zeros((2, 4, 4, 4)))
    picked = LatentFromBatch(RepeatLatentBatch(LatentFromBatch(one, 1, 1), 3), 2, 1)
    assert picked.batch_index == (3,)


def reshape_latent_to(target_shape, latent):
    """comfy_extras/nodes_latent.py reshape_latent_to."""
    if latent.shape[1:] != target_shape[1:]:
        latent = common_upscale(latent, target_shape[3], target_shape[2], "bilinear", "center")
    return repeat_to_batch_size(latent, target_shape[0])


@pytest.mark.parametrize("second", [(3, 12, 16), (1, 12, 16), (2, 9, 20), (5, 12, 16)])
def test_latent_add_subtract_multiply_match_comfyui(second):
    a, b = latents(3, 12, 16, 1), latents(*second, 2)
    s1, s2 = nchw(a), reshape_latent_to(nchw(a).shape, nchw(b))
    close(LatentAdd(Latent(mx.array(a)), Latent(mx.array(b))), s1 + s2)
    close(LatentSubtract(Latent(mx.array(a)), Latent(mx.array(b))), s1 - s2)
    close(LatentMultiply(Latent(mx.array(a)), -2.5), s1 * -2.5)


@pytest.mark.parametrize("index1, index2", [(None, None), ((4, 5), None), (None, (7,))])
def test_latent_batch_matches_comfyui(index1, index2):
    a, b = latents(2, 12, 16, 1), latents(1, 9, 20, 2)
    ours = LatentBatch(Latent(mx.array(a), index1), Latent(mx.array(b), index2))
    ref = torch.cat([nchw(a), common_upscale(nchw(b), 16, 12, "bilinear", "center")])
    close(ours, ref)
    assert ours.batch_index == (index1 or (0, 1)) + (index2 or (0,))


def test_latent_batch_seed_behavior():
    x = Latent(mx.zeros((3, 2, 2, 4)), (5, 6, 7))
    assert LatentBatchSeedBehavior(x, "fixed").batch_index == (5, 5, 5)
    assert LatentBatchSeedBehavior(Latent(x.samples), "fixed").batch_index == (0, 0, 0)
    assert LatentBatchSeedBehavior(x, "random").batch_index is None
