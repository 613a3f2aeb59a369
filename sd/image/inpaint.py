"""Pixels and masks prepared for inpainting as ComfyUI's VAEEncodeForInpaint / InpaintModelConditioning do:
the mask resized to the image (bilinear), both centre-cropped to multiples of 8, the masked pixels filled
with mid-grey, and the noise mask grown by a box kernel. NHWC float32, images in [0, 1], masks [B, H, W]."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from sd.image.bilinear import bilinear

SCALE = 8  # the VAE's downscale ratio


def _mask_batch(mask) -> np.ndarray:
    m = np.array(mx.array(mask).astype(mx.float32))
    return m.reshape((-1, m.shape[-2], m.shape[-1]))


def masked_pixels(pixels: mx.array, mask) -> tuple[mx.array, mx.array]:
    """(pixels cropped to multiples of 8 with the masked region mid-grey, the mask resized to the pixels and
    cropped alike (not rounded)). The grey fill uses the rounded mask; channels past RGB are left alone."""
    b, h, w, c = pixels.shape
    h8, w8 = h // SCALE * SCALE, w // SCALE * SCALE
    if h8 == 0 or w8 == 0:
        raise ValueError(f"image of {w}x{h} pixels is too small to encode (at least 8x8)")
    m = bilinear(_mask_batch(mask)[..., None], h, w)[..., 0]
    dy, dx = (h % SCALE) // 2, (w % SCALE) // 2
    image = np.array(pixels.astype(mx.float32))[:, dy:dy + h8, dx:dx + w8].copy()
    m = m[:, dy:dy + h8, dx:dx + w8]
    if m.shape[0] not in (1, b):
        raise ValueError(f"a batch of {m.shape[0]} masks does not fit a batch of {b} images")
    keep = 1.0 - np.round(m)
    rgb = min(3, c)
    image[..., :rgb] = (image[..., :rgb] - 0.5) * keep[..., None] + 0.5
    return mx.array(image), mx.array(np.ascontiguousarray(m))


def grow_mask(mask, grow_by: int) -> mx.array:
    """VAEEncodeForInpaint's noise mask: the rounded mask convolved with a grow_by x grow_by box of ones
    (padding ceil((k-1)/2), so an even kernel reaches one pixel further down/right), clamped to [0, 1], cut
    to the mask's size and rounded."""
    m = _mask_batch(mask)
    if grow_by == 0:
        return mx.array(np.round(m))
    b, h, w = m.shape
    pad = math.ceil((grow_by - 1) / 2)
    padded = np.pad(np.round(m).astype(np.float64), ((0, 0), (pad, pad), (pad, pad)))
    integral = np.pad(padded.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    k = grow_by
    sums = integral[:, k:, k:] - integral[:, :-k, k:] - integral[:, k:, :-k] + integral[:, :-k, :-k]
    grown = np.clip(sums[:, :h, :w], 0, 1)
    return mx.array(np.round(grown).astype(np.float32))
