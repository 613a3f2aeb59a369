"""Resizing NHWC arrays the way torch.nn.functional.interpolate does (ComfyUI's upscale methods), as
separable linear maps: each method is a [new, old] weight matrix applied along H, then along W."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

METHODS = ("nearest-exact", "bilinear", "area", "bicubic")


def _nearest_exact(old: int, new: int) -> np.ndarray:
    src = np.minimum(np.floor((np.arange(new) + 0.5) * old / new).astype(int), old - 1)
    w = np.zeros((new, old), np.float32)
    w[np.arange(new), src] = 1.0
    return w


def _bilinear(old: int, new: int) -> np.ndarray:
    # align_corners=False: pixel centres line up; source coordinates below 0 clamp to 0
    src = np.maximum((np.arange(new) + 0.5) * old / new - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), old - 1)
    i1 = np.minimum(i0 + 1, old - 1)
    frac = (src - i0).astype(np.float32)
    w = np.zeros((new, old), np.float32)
    np.add.at(w, (np.arange(new), i0), 1.0 - frac)
    np.add.at(w, (np.arange(new), i1), frac)
    return w


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def _bicubic(old: int, new: int) -> np.ndarray:
    src = (np.arange(new) + 0.5) * old / new - 0.5
    base = np.floor(src).astype(int)
    w = np.zeros((new, old), np.float32)
    for k in range(-1, 3):  # four taps; indices past the border repeat the edge pixel
        idx = np.clip(base + k, 0, old - 1)
        np.add.at(w, (np.arange(new), idx), _cubic(src - (base + k)).astype(np.float32))
    return w


def _area(old: int, new: int) -> np.ndarray:
    # adaptive average pooling: output i averages inputs [floor(i*old/new), ceil((i+1)*old/new))
    w = np.zeros((new, old), np.float32)
    for i in range(new):
        start, end = (i * old) // new, math.ceil((i + 1) * old / new)
        w[i, start:end] = 1.0 / (end - start)
    return w


_WEIGHTS = {"nearest-exact": _nearest_exact, "bilinear": _bilinear, "area": _area, "bicubic": _bicubic}


def resize(x: mx.array, height: int, width: int, method: str) -> mx.array:
    """x [B, H, W, C] -> [B, height, width, C]."""
    if method not in _WEIGHTS:
        raise ValueError(f"unknown resize method {method!r}; use one of {', '.join(METHODS)}")
    _, h, w, _ = x.shape
    # numpy on the CPU: latents are small, and GPU float32 matmuls may round through TF32
    a = np.array(x.astype(mx.float32))
    a = np.einsum("oh,bhwc->bowc", _WEIGHTS[method](h, height), a)
    return mx.array(np.einsum("ow,bhwc->bhoc", _WEIGHTS[method](w, width), a).astype(np.float32))


def center_crop_to_aspect(x: mx.array, width: int, height: int) -> mx.array:
    """Crop [B, H, W, C] symmetrically to the aspect ratio width/height (ComfyUI's crop="center")."""
    _, old_h, old_w, _ = x.shape
    old_aspect, new_aspect = old_w / old_h, width / height
    dx = dy = 0
    if old_aspect > new_aspect:
        dx = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        dy = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x[:, dy:old_h - dy, dx:old_w - dx, :]
