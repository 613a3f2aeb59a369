"""Mask nodes (nodes/masks.py) against ComfyUI's code: GrowMask vs scipy.ndimage grey dilation/erosion (what
ComfyUI calls), FeatherMask and MaskComposite vs torch transcriptions, LoadImageMask's channels on real PNG
files, and the simple ones (ImageToMask, MaskToImage, InvertMask, SolidMask, ThresholdMask)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from graph import Folders
from nodes.masks import (
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    ImageToMask,
    InvertMask,
    LoadImageMask,
    MaskComposite,
    MaskToImage,
    SolidMask,
    ThresholdMask,
)


def mask(b=2, h=12, w=15, seed=0, binary=False) -> np.ndarray:
    m = np.random.default_rng(seed).random((b, h, w), dtype=np.float32)
    return (m > 0.7).astype(np.float32) if binary else m


def grow_reference(m: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """ComfyUI's GrowMask.expand_mask."""
    c = 0 if tapered_corners else 1
    kernel = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    out = []
    for one in m.reshape((-1, m.shape[-2], m.shape[-1])):
        a = one.numpy()
        for _ in range(abs(expand)):
            if expand < 0:
                a = scipy.ndimage.grey_erosion(a, footprint=kernel)
            else:
                a = scipy.ndimage.grey_dilation(a, footprint=kernel)
        out.append(torch.from_numpy(a))
    return torch.stack(out, dim=0)


@pytest.mark.parametrize("expand", [0, 1, 3, -1, -4])
@pytest.mark.parametrize("tapered", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_grow_mask_matches_scipy(expand, tapered, binary):
    m = mask(binary=binary)
    ours = np.array(GrowMask(mx.array(m), expand, tapered))
    np.testing.assert_array_equal(ours, grow_reference(torch.from_numpy(m), expand, tapered).numpy())


def test_grow_mask_tapered_grows_a_diamond():
    m = np.zeros((1, 9, 9), np.float32)
    m[0, 4, 4] = 1
    diamond = np.array(GrowMask(mx.array(m), 2, True))[0]
    square = np.array(GrowMask(mx.array(m), 2, False))[0]
    assert diamond.sum() == 13 and square.sum() == 25


def feather_reference(m: torch.Tensor, left, top, right, bottom) -> torch.Tensor:
    """ComfyUI's FeatherMask.feather (including its output[:, :, -x] indexing)."""
    output = m.reshape((-1, m.shape[-2], m.shape[-1])).clone()
    left, right = min(left, output.shape[-1]), min(right, output.shape[-1])
    top, bottom = min(top, output.shape[-2]), min(bottom, output.shape[-2])
    for x in range(left):
        output[:, :, x] *= (x + 1.0) / left
    for x in range(right):
        output[:, :, -x] *= (x + 1) / right
    for y in range(top):
        output[:, y, :] *= (y + 1) / top
    for y in range(bottom):
        output[:, -y, :] *= (y + 1) / bottom
    return output


@pytest.mark.parametrize("sides", [(0, 0, 0, 0), (3, 0, 0, 0), (0, 2, 4, 0), (1, 2, 3, 5), (40, 40, 40, 40)])
def test_feather_mask_matches_comfyui(sides):
    m = mask()
    ours = np.array(FeatherMask(mx.array(m), *sides))
    np.testing.assert_allclose(ours, feather_reference(torch.from_numpy(m), *sides).numpy(), rtol=1e-6)


def composite_reference(destination, source, x, y, operation):
    """ComfyUI's MaskComposite.combine."""
    output = destination.reshape((-1, destination.shape[-2], destination.shape[-1])).clone()
    source = source.reshape((-1, source.shape[-2], source.shape[-1]))
    left, top = x, y
    right = min(left + source.shape[-1], destination.shape[-1])
    bottom = min(top + source.shape[-2], destination.shape[-2])
    visible_width, visible_height = right - left, bottom - top
    s = source[:, :visible_height, :visible_width]
    d = destination[:, top:bottom, left:right]
    if operation == "multiply":
        output[:, top:bottom, left:right] = d * s
    elif operation == "add":
        output[:, top:bottom, left:right] = d + s
    elif operation == "subtract":
        output[:, top:bottom, left:right] = d - s
    elif operation == "and":
        output[:, top:bottom, left:right] = torch.bitwise_and(d.round().bool(), s.round().bool()).float()
    elif operation == "or":
        output[:, top:bottom, left:right] = torch.bitwise_or(d.round().bool(), s.round().bool()).float()
    elif operation == "xor":
        output[:, top:bottom, left:right] = torch.bitwise_xor(d.round().bool(), s.round().bool()).float()
    return torch.clamp(output, 0.0, 1.0)


@pytest.mark.parametrize("operation", ["multiply", "add", "subtract", "and", "or", "xor"])
@pytest.mark.parametrize("x, y", [(0, 0), (4, 3), (10, 9), (14, 11)])
@pytest.mark.parametrize("source_batch", [1, 2])
def test_mask_composite_matches_comfyui(operation, x, y, source_batch):
    dest = 1.4 * mask(2, 12, 15, 1) - 0.2  # values outside [0, 1] too: the whole result is clamped
    src = mask(source_batch, 6, 8, 2)
    ours = np.array(MaskComposite(mx.array(dest), mx.array(src), x, y, operation))
    ref = composite_reference(torch.from_numpy(dest), torch.from_numpy(src), x, y, operation).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_mask_composite_outside_the_destination_only_clamps():
    dest = 1.5 * mask(1, 5, 5)
    out = np.array(MaskComposite(mx.array(dest), mx.array(mask(1, 2, 2)), 99, 99, "add"))
    np.testing.assert_array_equal(out, np.clip(dest, 0, 1))


def test_simple_mask_nodes():
    img = np.random.default_rng(0).random((2, 4, 5, 3), dtype=np.float32)
    for i, channel in enumerate(["red", "green", "blue"]):
        np.testing.assert_array_equal(np.array(ImageToMask(mx.array(img), channel)), img[..., i])
    with pytest.raises(ValueError, match="no alpha channel"):
        ImageToMask(mx.array(img), "alpha")
    m = mask()
    as_image = np.array(MaskToImage(mx.array(m)))
    assert as_image.shape == m.shape + (3,) and np.array_equal(as_image[..., 2], m)
    np.testing.assert_array_equal(np.array(InvertMask(mx.array(m))), 1.0 - m)
    solid = np.array(SolidMask(0.25, 7, 3))
    assert solid.shape == (1, 3, 7) and np.all(solid == np.float32(0.25))
    np.testing.assert_array_equal(np.array(ThresholdMask(mx.array(m), 0.4)), (m > 0.4).astype(np.float32))


def load_mask_reference(path, channel: str) -> np.ndarray:
    """ComfyUI's LoadImageMask.load_image."""
    from PIL import ImageOps

    i = ImageOps.exif_transpose(Image.open(path))
    if i.getbands() != ("R", "G", "B", "A"):
        if i.mode == "I":
            i = i.point(lambda v: v * (1 / 255))
        i = i.convert("RGBA")
    c = channel[0].upper()
    m = torch.from_numpy(np.array(i.getchannel(c)).astype(np.float32) / 255.0)
    if c == "A":
        m = 1.0 - m
    return m.unsqueeze(0).numpy()


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA", "P"])
@pytest.mark.parametrize("channel", ["alpha", "red", "green", "blue"])
def test_load_image_mask_matches_comfyui(tmp_path, mode, channel):
    rgba = np.random.default_rng(7).integers(0, 256, (9, 11, 4), dtype=np.uint8)
    path = tmp_path / f"mask_{mode}.png"
    Image.fromarray(rgba, "RGBA").convert(mode).save(path)
    ctx = SimpleNamespace(folders=Folders(output_dir=tmp_path, input_dir=tmp_path, models_dir=tmp_path))
    ours = np.array(LoadImageMask(path.name, channel, ctx=ctx))
    np.testing.assert_allclose(ours, load_mask_reference(path, channel), atol=1e-7)
    if mode == "RGB" and channel == "alpha":
        assert not ours.any()  # no alpha: opaque, nothing to paint


@pytest.mark.parametrize("window", [(0, 0, 5, 5), (3, 2, 100, 4), (14, 11, 1, 1)])
def test_crop_mask_like_comfyui(window):
    x, y, width, height = window
    m = mask()
    np.testing.assert_array_equal(np.array(CropMask(mx.array(m), x, y, width, height)),
                                  m[:, y:y + height, x:x + width])
    with pytest.raises(ValueError, match="outside the 15x12 mask"):
        CropMask(mx.array(m), 15, 0, 4, 4)


def test_image_color_to_mask_like_comfyui():
    img = np.random.default_rng(2).integers(0, 4, (2, 6, 7, 3)).astype(np.float32) * (85 / 255)
    color = (85 << 16) + (170 << 8) + 255
    t = (torch.clamp(torch.from_numpy(img), 0, 1.0) * 255.0).round().to(torch.int)
    t = torch.bitwise_left_shift(t[..., 0], 16) + torch.bitwise_left_shift(t[..., 1], 8) + t[..., 2]
    ref = torch.where(t == color, 1.0, 0).float().numpy()
    ours = np.array(ImageColorToMask(mx.array(img), color))
    assert ref.any()
    np.testing.assert_array_equal(ours, ref)
