"""Image nodes (nodes/image_ops.py) against torch transcriptions of ComfyUI's code on random images:
ImageScale's modes vs common_upscale (torch interpolate; PIL lanczos on 8-bit copies), the size rules of
ImageScale/ImageScaleBy/ImageScaleToTotalPixels, ImagePadForOutpaint's feathered mask, ImageCompositeMasked
vs nodes_mask.composite, ImageBatch, ImageCrop, EmptyImage, ImageInvert."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from comfy_image_reference import common_upscale, composite, nchw, nhwc

from nodes.image_ops import (
    EmptyImage,
    ImageBatch,
    ImageCompositeMasked,
    ImageCrop,
    ImageFlip,
    ImageFromBatch,
    ImageInvert,
    ImagePadForOutpaint,
    ImageRotate,
    ImageScale,
    ImageScaleBy,
    ImageScaleToTotalPixels,
    RepeatImageBatch,
)

METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


def image(b=2, h=24, w=36, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, h, w, 3), dtype=np.float32)


def close(ours, ref, atol=1e-5):
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("crop", ["disabled", "center"])
@pytest.mark.parametrize("size", [(50, 30), (17, 40), (36, 24)])
def test_image_scale_matches_common_upscale(method, crop, size):
    x = image()
    width, height = size
    ours = ImageScale(mx.array(x), method, width, height, crop)
    ref = nhwc(common_upscale(nchw(x), width, height, method, crop))
    assert ours.shape == (2, height, width, 3)
    close(ours, ref)


def test_image_scale_zero_side_keeps_the_aspect():
    x = mx.array(image(1, 20, 40))
    assert ImageScale(x, "bilinear", 0, 0, "disabled") is x
    assert ImageScale(x, "bilinear", 0, 10, "disabled").shape == (1, 10, 20, 3)
    assert ImageScale(x, "area", 30, 0, "disabled").shape == (1, 15, 30, 3)
    assert ImageScale(x, "nearest-exact", 0, 1, "disabled").shape == (1, 1, 2, 3)


@pytest.mark.parametrize("method", METHODS)
def test_image_scale_by_rounds_like_comfyui(method):
    x = image(1, 21, 33)
    ours = ImageScaleBy(mx.array(x), method, 1.5)
    width, height = round(33 * 1.5), round(21 * 1.5)
    close(ours, nhwc(common_upscale(nchw(x), width, height, method, "disabled")))
    with pytest.raises(ValueError, match="0x0"):
        ImageScaleBy(mx.array(image(1, 4, 4)), method, 0.01)


@pytest.mark.parametrize("megapixels, steps", [(0.001, 1), (0.002, 8), (0.0005, 16)])
def test_scale_to_total_pixels_uses_comfyui_sizes(megapixels, steps):
    x = image(1, 30, 50)
    ours = ImageScaleToTotalPixels(mx.array(x), "bicubic", megapixels, steps)
    factor = math.sqrt(megapixels * 1024 * 1024 / (50 * 30))
    width = round(50 * factor / steps) * steps
    height = round(30 * factor / steps) * steps
    assert ours.shape == (1, height, width, 3)
    close(ours, nhwc(common_upscale(nchw(x), width, height, "bicubic", "disabled")))


def test_empty_image_and_invert():
    out = np.array(EmptyImage(5, 3, 2, 0x3366FF))
    assert out.shape == (2, 3, 5, 3)
    ref = torch.cat([torch.full([2, 3, 5, 1], v / 0xFF) for v in (0x33, 0x66, 0xFF)], dim=-1).numpy()
    np.testing.assert_array_equal(out, ref)
    x = image()
    np.testing.assert_array_equal(np.array(ImageInvert(mx.array(x))), 1.0 - x)


def test_image_batch_rescales_the_second_to_the_first():
    a, b = image(2, 24, 36, 1), image(3, 40, 30, 2)
    ours = ImageBatch(mx.array(a), mx.array(b))
    ref = torch.cat([torch.from_numpy(a), torch.from_numpy(nhwc(common_upscale(nchw(b), 36, 24, "bilinear",
                                                                                 "center")))])
    close(ours, ref.numpy())
    assert ImageBatch(mx.array(a), mx.array(a)).shape == (4, 24, 36, 3)


@pytest.mark.parametrize("window", [(10, 8, 3, 4), (100, 100, 30, 20), (5, 5, 999, 999), (1, 1, 0, 0)])
def test_image_crop_clamps_like_comfyui(window):
    width, height, x, y = window
    img = torch.from_numpy(image())
    xc, yc = min(x, img.shape[2] - 1), min(y, img.shape[1] - 1)
    ref = img[:, yc:yc + height, xc:xc + width, :].numpy()
    np.testing.assert_array_equal(np.array(ImageCrop(mx.array(img.numpy()), width, height, x, y)), ref)


def pad_reference(image: torch.Tensor, left, top, right, bottom, feathering):
    """ComfyUI's ImagePadForOutpaint.expand_image (current: the canvas is 0.5 grey)."""
    d1, d2, d3, d4 = image.size()
    new_image = torch.ones((d1, d2 + top + bottom, d3 + left + right, d4), dtype=torch.float32) * 0.5
    new_image[:, top:top + d2, left:left + d3, :] = image
    mask = torch.ones((d2 + top + bottom, d3 + left + right), dtype=torch.float32)
    t = torch.zeros((d2, d3), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < d2 and feathering * 2 < d3:
        for i in range(d2):
            for j in range(d3):
                dt = i if top != 0 else d2
                db = d2 - i if bottom != 0 else d2
                dl = j if left != 0 else d3
                dr = d3 - j if right != 0 else d3
                d = min(dt, db, dl, dr)
                if d >= feathering:
                    continue
                v = (feathering - d) / feathering
                t[i, j] = v * v
    mask[top:top + d2, left:left + d3] = t
    return new_image, mask


@pytest.mark.parametrize("margins", [(8, 0, 16, 8, 5), (0, 8, 0, 0, 4), (3, 5, 7, 9, 40), (8, 8, 8, 8, 0),
                                     (0, 0, 0, 0, 3), (16, 0, 0, 0, 11)])
def test_pad_for_outpaint_matches_comfyui(margins):
    x = image(2, 20, 24)
    img, mask = ImagePadForOutpaint(mx.array(x), *margins)
    ref_img, ref_mask = pad_reference(torch.from_numpy(x), *margins)
    np.testing.assert_array_equal(np.array(img), ref_img.numpy())
    assert mask.shape == (1,) + tuple(ref_mask.shape)
    np.testing.assert_array_equal(np.array(mask)[0], ref_mask.numpy())


@pytest.mark.parametrize("x, y", [(0, 0), (5, 7), (30, 2), (36, 24), (100, 100)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_image_composite_masked_matches_comfyui(x, y, with_mask):
    dest, src = image(2, 24, 36, 1), image(1, 10, 14, 2)
    mask = np.random.default_rng(3).random((1, 7, 9), dtype=np.float32) if with_mask else None
    ours = ImageCompositeMasked(mx.array(dest), mx.array(src), x, y, False,
                                None if mask is None else mx.array(mask))
    ref = composite(nchw(dest), nchw(src), x, y, None if mask is None else torch.from_numpy(mask), 1)
    close(ours, nhwc(ref))


def test_image_composite_resize_source_and_batches():
    dest, src = image(3, 24, 36, 1), image(2, 10, 14, 2)
    mask = np.random.default_rng(4).random((2, 24, 36), dtype=np.float32)
    ours = ImageCompositeMasked(mx.array(dest), mx.array(src), 4, 4, True, mx.array(mask))
    ref = composite(nchw(dest), nchw(src), 4, 4, torch.from_numpy(mask), 1, resize_source=True)
    close(ours, nhwc(ref))


@pytest.mark.parametrize("start, length", [(0, 1), (1, 5), (9, 2), (2, 1), (-1, 1), (-2, 5), (-9, 1)])
def test_image_batch_repeat_and_pick_like_comfyui(start, length):
    x = image(3)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(np.array(RepeatImageBatch(mx.array(x), 3)), t.repeat((3, 1, 1, 1)).numpy())
    s = start + t.shape[0] if start < 0 else start  # current ComfyUI's ImageFromBatch
    s = max(0, min(t.shape[0] - 1, s))
    ref = t[s:s + min(t.shape[0] - s, length)].numpy()
    np.testing.assert_array_equal(np.array(ImageFromBatch(mx.array(x), start, length)), ref)


def test_image_flip_and_rotate_match_torch():
    x = image(2, 6, 10)
    t = torch.from_numpy(x)
    for method, dim in (("x-axis: vertically", 1), ("y-axis: horizontally", 2)):
        np.testing.assert_array_equal(np.array(ImageFlip(mx.array(x), method)), torch.flip(t, [dim]).numpy())
    for k, rotation in enumerate(["none", "90 degrees", "180 degrees", "270 degrees"]):
        ref = torch.rot90(t, k=k, dims=[2, 1]).numpy()
        np.testing.assert_array_equal(np.array(ImageRotate(mx.array(x), rotation)), ref)
