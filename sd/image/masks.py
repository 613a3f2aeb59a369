"""Mask operations behind ComfyUI's mask nodes (comfy_extras/nodes_mask.py). A mask is [B, H, W] float32,
1 = the region to change; arrays in and out as `mx.array` (the work is numpy on the CPU).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from sd.image.ops import as_numpy

CHANNELS = ("red", "green", "blue", "alpha")
COMPOSITE_OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")


def as_batch(mask) -> np.ndarray:
    """[H, W] or [B, H, W] (or [B, 1, H, W]) as [B, H, W] float32."""
    m = as_numpy(mask)
    return m.reshape((-1,) + m.shape[-2:])


def from_image(image, channel: str) -> mx.array:
    """ImageToMask: one channel of an NHWC image."""
    a = as_numpy(image)
    index = CHANNELS.index(channel)
    if index >= a.shape[-1]:
        raise ValueError(f"the image has {a.shape[-1]} channels; it has no {channel} channel")
    return mx.array(np.ascontiguousarray(a[..., index]))


def color_to_mask(image, color: int) -> mx.array:
    """ImageColorToMask: 1.0 where the pixel, rounded to 8 bits a channel, is 0xRRGGBB `color` (current
    ComfyUI; versions before 2025 wrote 255 instead of 1)."""
    rgb = np.round(np.clip(as_numpy(image)[..., :3], 0, 1) * 255.0).astype(np.int64)
    packed = (rgb[..., 0] << 16) + (rgb[..., 1] << 8) + rgb[..., 2]
    return mx.array((packed == color).astype(np.float32))


def to_image(mask) -> mx.array:
    """MaskToImage: the mask as a grey RGB image [B, H, W, 3]."""
    m = as_batch(mask)
    return mx.array(np.repeat(m[..., None], 3, axis=-1))


def solid(value: float, width: int, height: int) -> mx.array:
    return mx.full((1, height, width), value, dtype=mx.float32)


def invert(mask) -> mx.array:
    return mx.array(1.0 - as_numpy(mask))


def crop(mask, x: int, y: int, width: int, height: int) -> mx.array:
    """CropMask: the window, cut off at the mask's edges."""
    m = as_batch(mask)
    if x >= m.shape[2] or y >= m.shape[1]:
        raise ValueError(f"the crop at ({x}, {y}) lies outside the {m.shape[2]}x{m.shape[1]} mask")
    return mx.array(np.ascontiguousarray(m[:, y:y + height, x:x + width]))


def threshold(mask, value: float) -> mx.array:
    """ThresholdMask: 1 where the mask is above `value`, else 0."""
    return mx.array((as_numpy(mask) > value).astype(np.float32))


def grow(mask, expand: int, tapered_corners: bool = True) -> mx.array:
    """GrowMask: `expand` times a 3x3 grey dilation (negative: erosion), with the corners of the 3x3
    left out when tapered. Outside the mask counts as its edge pixel (scipy.ndimage's "reflect" border,
    which ComfyUI uses), so nothing grows in from the border."""
    m = as_batch(mask)
    reduce = np.maximum if expand > 0 else np.minimum
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if not (tapered_corners and dy and dx)]
    h, w = m.shape[1:]
    for _ in range(abs(expand)):
        padded = np.pad(m, ((0, 0), (1, 1), (1, 1)), mode="edge")
        out = m.copy()
        for dy, dx in offsets:
            out = reduce(out, padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
        m = out
    return mx.array(m)


def feather(mask, left: int, top: int, right: int, bottom: int) -> mx.array:
    """FeatherMask: the mask faded linearly to the given sides, row/column k from a side (k from 1)
    scaled by k / width of that side's band."""
    m = as_batch(mask).copy()
    h, w = m.shape[1:]
    left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
    for k in range(left):
        m[:, :, k] *= (k + 1.0) / left
    # ComfyUI indexes the right and bottom bands with -k, so k = 0 scales the first column/row (not the
    # last) by 1/band and the last one gets 2/band; kept, so masks match ComfyUI's
    for k in range(right):
        m[:, :, -k] *= (k + 1) / right
    for k in range(top):
        m[:, k, :] *= (k + 1) / top
    for k in range(bottom):
        m[:, -k, :] *= (k + 1) / bottom
    return mx.array(m)


def combine(destination, source, x: int, y: int, operation: str) -> mx.array:
    """MaskComposite: `source` combined into `destination` at (x, y) by `operation` (and/or/xor on the
    masks rounded to 0/1), cut off at the destination's edges, the result clamped to [0, 1]."""
    if operation not in COMPOSITE_OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; use one of {', '.join(COMPOSITE_OPERATIONS)}")
    out, src = as_batch(destination).copy(), as_batch(source)
    if src.shape[0] not in (1, out.shape[0]):
        raise ValueError(f"cannot combine a batch of {src.shape[0]} masks into a batch of {out.shape[0]}")
    h, w = out.shape[1:]
    right, bottom = min(x + src.shape[2], w), min(y + src.shape[1], h)
    if right > x and bottom > y:
        s, d = src[:, :bottom - y, :right - x], out[:, y:bottom, x:right]
        if operation == "multiply":
            result = d * s
        elif operation == "add":
            result = d + s
        elif operation == "subtract":
            result = d - s
        else:
            logic = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[operation]
            result = logic(np.round(d) != 0, np.round(s) != 0).astype(np.float32)
        out[:, y:bottom, x:right] = result
    return mx.array(np.clip(out, 0.0, 1.0))
