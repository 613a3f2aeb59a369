"""Canny edges as kornia's `kornia.filters.canny` finds them (what ComfyUI's Canny node calls), in numpy:
grayscale (0.299, 0.587, 0.114), 5x5 Gaussian blur with sigma 1 (separable, reflect padding), unnormalised
Sobel gradients (replicate padding), magnitude sqrt(gx^2 + gy^2 + 1e-6), non-maximum suppression along the
gradient direction rounded to 45 degrees, then hysteresis over 8-neighbours.

The non-maximum rule follows kornia 0.9 (ties kept towards the right / lower neighbour, as OpenCV keeps them);
kornia before 0.8 needed a strictly larger magnitude on both sides, which differs only on exact ties.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6
# neighbour offsets (dy, dx) by direction index: 0 = right, then every 45 degrees (kornia's window order)
_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _gaussian(size: int = 5, sigma: float = 1.0) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - size // 2
    g = np.exp(-(x * x) / np.float32(2 * sigma * sigma)).astype(np.float32)
    return g / g.sum()


def _filter_1d(a: np.ndarray, taps: np.ndarray, axis: int, mode: str) -> np.ndarray:
    r = len(taps) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode=mode)
    n = a.shape[axis]
    out = np.zeros_like(a)
    for i, t in enumerate(taps):
        out = out + t * np.take(p, range(i, i + n), axis=axis)
    return out


def _gradients(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] (gx) and its transpose (gy), replicate padding."""
    p = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = gray.shape[1:]

    def at(dy, dx):
        return p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    gy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return gx, gy


def _hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected (through weak pixels) to a strong one become edges."""
    edges = strong.copy()
    while True:
        p = np.pad(edges, ((0, 0), (1, 1), (1, 1)))
        h, w = edges.shape[1:]
        near = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        grown = edges | (near & weak)
        if (grown == edges).all():
            return edges
        edges = grown


def canny(image: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """image [B, H, W, 3] (or 1 channel) in [0, 1] -> edges [B, H, W] of 0 and 1 (float32)."""
    x = image.astype(np.float32)
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]) if x.shape[-1] >= 3 else x[..., 0]
    gray = gray.astype(np.float32)
    taps = _gaussian()
    blurred = _filter_1d(_filter_1d(gray, taps, 2, "reflect"), taps, 1, "reflect")
    gx, gy = _gradients(blurred)
    magnitude = np.sqrt(gx * gx + gy * gy + np.float32(EPS))
    direction = np.round(np.arctan2(gy, gx) * np.float32(4 / np.pi)).astype(np.int64)
    positive, negative = direction % 8, (direction + 4) % 8
    padded = np.pad(magnitude, ((0, 0), (1, 1), (1, 1)), constant_values=np.sqrt(np.float32(EPS)))
    h, w = magnitude.shape[1:]
    window = np.stack([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in _OFFSETS])

    def beats(index):
        neighbour = np.take_along_axis(window, index[None], axis=0)[0]
        tie_ok = (index == 0) | (index == 2)
        return (magnitude > neighbour) | (tie_ok & (magnitude == neighbour))

    is_max = beats(positive) & beats(negative) & (magnitude > np.sqrt(np.float32(EPS)))
    magnitude = magnitude * is_max
    return _hysteresis(magnitude > low_threshold, magnitude > high_threshold).astype(np.float32)
