"""Resizing NHWC arrays as ComfyUI's `comfy.utils.common_upscale` does. The torch.nn.functional.interpolate
modes are separable linear maps: each a [new, old] weight matrix applied along H, then along W. "lanczos"
(images) goes through Pillow on 8-bit copies and "bislerp" (latents) interpolates along the sphere, both as
ComfyUI does."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
IMAGE_METHODS = METHODS + ("lanczos",)   # ComfyUI's ImageScale list
LATENT_METHODS = METHODS + ("bislerp",)  # ComfyUI's LatentUpscale list


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
    if method == "lanczos":
        return _lanczos(x, height, width)
    if method == "bislerp":
        return mx.array(bislerp(np.array(x.astype(mx.float32)), height, width))
    if method not in _WEIGHTS:
        known = ", ".join(METHODS + ("lanczos", "bislerp"))
        raise ValueError(f"unknown resize method {method!r}; use one of {known}")
    b, h, w, c = x.shape
    if (h, w) == (height, width):
        return x  # every method maps a size onto itself unchanged
    # numpy on the CPU (BLAS matmuls): GPU float32 matmuls may round through TF32
    a = np.array(x.astype(mx.float32)).reshape(b, h, w * c)
    a = (_WEIGHTS[method](h, height) @ a).reshape(b, height, w, c)
    a = a.transpose(0, 2, 1, 3).reshape(b, w, height * c)
    a = (_WEIGHTS[method](w, width) @ a).reshape(b, width, height, c).transpose(0, 2, 1, 3)
    return mx.array(np.ascontiguousarray(a, dtype=np.float32))


def _lanczos(x: mx.array, height: int, width: int) -> mx.array:
    """Pillow's LANCZOS filter on 8-bit copies (values clipped to [0, 1], truncated to 1/255 steps), one
    image at a time: ComfyUI's `lanczos`, so the result is quantised exactly as there."""
    from PIL import Image

    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {width}x{height} pixels")
    a = np.array(x.astype(mx.float32))
    channels = a.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"lanczos resizes images with 1, 3 or 4 channels, not {channels}")
    out = []
    for img in np.clip(255.0 * a, 0, 255).astype(np.uint8):
        pil = Image.fromarray(img[..., 0] if channels == 1 else img)
        r = np.asarray(pil.resize((width, height), resample=Image.Resampling.LANCZOS), np.float32) / 255.0
        out.append(r.reshape(height, width, channels))
    return mx.array(np.stack(out))


def _slerp(a: np.ndarray, b: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Spherical interpolation of rows a, b [N, C] by r [N, 1], magnitudes interpolated linearly; equal
    directions keep a, opposite ones fall back to a straight lerp (ComfyUI's bislerp rules)."""
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ua = np.where(na == 0, 0.0, a / na).astype(np.float32)
        ub = np.where(nb == 0, 0.0, b / nb).astype(np.float32)
        dot = (ua * ub).sum(-1)
        omega = np.arccos(dot)
        so = np.sin(omega)
        wa, wb = np.sin((1.0 - r[:, 0]) * omega) / so, np.sin(r[:, 0] * omega) / so
        res = wa[:, None] * ua + wb[:, None] * ub
    res = (res * (na * (1.0 - r) + nb * r)).astype(np.float32)
    same, opposite = dot > 1 - 1e-5, dot < 1e-5 - 1
    res[same] = a[same]
    res[opposite] = (a * (1.0 - r) + b * r)[opposite]
    return res


def _bislerp_taps(old: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first tap, second tap, ratio) per output position: where bilinear interpolation (align_corners
    False, edges clamped) of the indices 0..old-1, and of 1..old-1 with the last repeated, lands."""
    f32 = np.float32  # torch computes these positions in float32; the int casts below truncate them
    src = np.maximum(f32(old) / f32(new) * (np.arange(new, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(src.astype(np.int64), old - 1)
    frac = np.clip(src - i0.astype(f32), 0, 1).astype(f32)
    lo = i0.astype(f32)
    hi = np.minimum(i0 + 1, old - 1).astype(f32)
    first = lo * (1 - frac) + hi * frac            # the interpolated index itself
    second_lo, second_hi = np.minimum(lo + 1, old - 1), np.minimum(hi + 1, old - 1)
    second = second_lo * (1 - frac) + second_hi * frac
    ratio = first - np.floor(first)
    return first.astype(np.int64), second.astype(np.int64), ratio.astype(np.float32)


def bislerp(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """x [B, H, W, C] -> [B, height, width, C], slerping channel vectors along W, then along H."""
    b, h, w, c = x.shape
    first, second, ratio = _bislerp_taps(w, width)
    rows = _slerp(x[:, :, first].reshape(-1, c), x[:, :, second].reshape(-1, c),
                  np.broadcast_to(ratio[None, None, :], (b, h, width)).reshape(-1, 1))
    x = rows.reshape(b, h, width, c)
    first, second, ratio = _bislerp_taps(h, height)
    cols = _slerp(x[:, first].reshape(-1, c), x[:, second].reshape(-1, c),
                  np.broadcast_to(ratio[None, :, None], (b, height, width)).reshape(-1, 1))
    return cols.reshape(b, height, width, c)


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
