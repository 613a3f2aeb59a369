"""Bilinear resizing computed as torch's CPU `interpolate(mode="bilinear", align_corners=False)` computes it,
nearly to the float32 bit: the source coordinate `scale * (i + 0.5) - 0.5` rounded once (torch's build fuses
it), float32 weights, rows outer and columns inner. Masks are rounded after resizing (inpainting), and a
binary mask resized lands many values on 0.5 exactly, where the last bit decides the rounding; the matrix
form in resize.py agrees with torch only to ~2e-6, which flips some of those. This one is within 1 ulp and
rounds as torch does (tests/test_inpaint_inputs.py)."""

from __future__ import annotations

import numpy as np


def _taps(old: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(old) / np.float32(new)
    centres = np.arange(new, dtype=np.float64) + 0.5
    src = (np.float64(scale) * centres - 0.5).astype(np.float32)  # one rounding, as a fused multiply-add
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, old - 1)
    lambda1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    lambda0 = (np.float32(1.0) - lambda1).astype(np.float32)
    return i0, i1, lambda0, lambda1


def bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """a [B, H, W, C] float32 -> [B, height, width, C]."""
    a = np.asarray(a, dtype=np.float32)
    _, h, w, _ = a.shape
    if (h, w) == (height, width):
        return a
    h0, h1, hl0, hl1 = _taps(h, height)
    w0, w1, wl0, wl1 = _taps(w, width)
    wl0, wl1 = wl0[None, None, :, None], wl1[None, None, :, None]
    top, bottom = a[:, h0], a[:, h1]  # [B, height, W, C]
    row_top = top[:, :, w0] * wl0 + top[:, :, w1] * wl1
    row_bottom = bottom[:, :, w0] * wl0 + bottom[:, :, w1] * wl1
    out = row_top * hl0[None, :, None, None] + row_bottom * hl1[None, :, None, None]
    return out.astype(np.float32)
