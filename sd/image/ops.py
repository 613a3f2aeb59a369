"""Pixel and latent array operations behind ComfyUI's everyday image and latent nodes (nodes.py,
comfy_extras/nodes_mask.py, nodes_images.py), on NHWC arrays. Sizes and offsets are in array units: the
latent nodes divide ComfyUI's pixel inputs by 8 before calling in. The work is small and done in numpy on
the CPU (exact float32, like the torch code it follows); results come back as float32 `mx.array`s.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from sd.image.resize import center_crop_to_aspect, resize


def as_numpy(x) -> np.ndarray:
    """A float32 numpy copy of an mx or numpy array."""
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return np.array(x, dtype=np.float32)


def scale(x, width: int, height: int, method: str, crop: str = "disabled") -> mx.array:
    """ComfyUI's `common_upscale` on NHWC: an optional centre crop to the new aspect ratio, then resize."""
    x = mx.array(as_numpy(x))
    if crop == "center":
        x = center_crop_to_aspect(x, width, height)
    return resize(x, height, width, method)


def size_keeping_aspect(h: int, w: int, width: int, height: int) -> tuple[int, int]:
    """ImageScale's rule for a 0 side: (width, height) with the zero side taken from the aspect ratio."""
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    return width, height


def size_for_megapixels(h: int, w: int, megapixels: float, steps: int = 1) -> tuple[int, int]:
    """ImageScaleToTotalPixels: (width, height) of about megapixels * 2^20 pixels with the same aspect,
    each side rounded to a multiple of `steps`."""
    factor = math.sqrt(megapixels * 1024 * 1024 / (w * h))
    return round(w * factor / steps) * steps, round(h * factor / steps) * steps


def empty_image(width: int, height: int, batch_size: int, color: int) -> mx.array:
    """A batch of one colour, `color` as 0xRRGGBB."""
    rgb = np.array([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], np.float64) / 0xFF
    return mx.array(np.broadcast_to(rgb.astype(np.float32), (batch_size, height, width, 3)).copy())


def repeat_to_batch(x: np.ndarray, n: int) -> np.ndarray:
    """x's batch repeated cyclically, or cut, to n (comfy.utils.repeat_to_batch_size)."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x] * math.ceil(n / x.shape[0]))[:n]


def join_batches(first, second) -> mx.array:
    """ImageBatch: `second` resized (bilinear, centre-cropped) to `first`'s size when they differ, then
    both batches one after the other."""
    a, b = as_numpy(first), as_numpy(second)
    if a.shape[3] != b.shape[3]:
        raise ValueError(f"cannot batch images of {a.shape[3]} and {b.shape[3]} channels")
    if a.shape[1:] != b.shape[1:]:
        b = as_numpy(scale(b, a.shape[2], a.shape[1], "bilinear", "center"))
    return mx.array(np.concatenate([a, b]))


def match_shape(x, like_shape: tuple[int, ...]) -> np.ndarray:
    """x resized (bilinear, centre crop) to like_shape's size where it differs, its batch repeated or cut
    to like_shape's (ComfyUI's reshape_latent_to, behind LatentAdd / LatentSubtract)."""
    a = as_numpy(x)
    if a.shape[1:] != tuple(like_shape[1:]):
        a = as_numpy(scale(a, like_shape[2], like_shape[1], "bilinear", "center"))
    return repeat_to_batch(a, like_shape[0])


def crop(x, x0: int, y0: int, width: int, height: int) -> mx.array:
    """ImageCrop: the width x height window at (x0, y0), the corner kept inside the image and the window
    cut off at its edges."""
    a = as_numpy(x)
    x0, y0 = min(x0, a.shape[2] - 1), min(y0, a.shape[1] - 1)
    return mx.array(a[:, y0:y0 + height, x0:x0 + width])


def pad_for_outpaint(image, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> tuple[mx.array, mx.array]:
    """ImagePadForOutpaint: the image on a grey (0.5) canvas grown by the given margins, and a mask
    [1, H, W] that is 1 on the margins and, inside the image, ((f - d) / f)^2 within f = feathering pixels
    of a padded side (d = distance to that side), else 0. Feathering that does not fit twice into both
    sides of the image is skipped."""
    a = as_numpy(image)
    b, h, w, c = a.shape
    # current ComfyUI fills with 0.5; versions before mid-2024 filled with 0
    canvas = np.full((b, h + top + bottom, w + left + right, c), 0.5, np.float32)
    canvas[:, top:top + h, left:left + w] = a
    mask = np.ones((1, h + top + bottom, w + left + right), np.float32)
    inner = np.zeros((h, w), np.float64)
    if 0 < feathering and 2 * feathering < h and 2 * feathering < w:
        i, j = np.arange(h)[:, None], np.arange(w)[None, :]
        # distance to each padded side (a side without padding counts as far away); the bottom and right
        # distances start at 1, as ComfyUI counts them
        d = np.minimum.reduce([np.broadcast_to(i if top else h, (h, w)),
                               np.broadcast_to(h - i if bottom else h, (h, w)),
                               np.broadcast_to(j if left else w, (h, w)),
                               np.broadcast_to(w - j if right else w, (h, w))])
        inner = np.where(d < feathering, ((feathering - d) / feathering) ** 2, 0.0)
    mask[0, top:top + h, left:left + w] = inner
    return mx.array(canvas), mx.array(mask)


def composite(destination, source, x: int, y: int, mask=None, multiplier: int = 1,
              resize_source: bool = False) -> mx.array:
    """ComfyUI's masked composite (ImageCompositeMasked, LatentCompositeMasked): `source` pasted onto
    `destination` at (x, y) // multiplier (pixels; multiplier 8 for latents), blended by `mask` [B, H, W]
    (resized bilinearly to the source, 1 = source), cut off at the destination's edges. Batches repeat
    cyclically to the destination's size."""
    dest, src = as_numpy(destination), as_numpy(source)
    _, dh, dw, _ = dest.shape
    if resize_source:
        src = as_numpy(resize(mx.array(src), dh, dw, "bilinear"))
    src = repeat_to_batch(src, dest.shape[0])
    _, sh, sw, _ = src.shape
    x = max(-sw * multiplier, min(x, dw * multiplier))
    y = max(-sh * multiplier, min(y, dh * multiplier))
    left, top = x // multiplier, y // multiplier
    if mask is None:
        m = np.ones((src.shape[0], sh, sw, 1), np.float32)
    else:
        m = as_numpy(mask)
        m = m.reshape((-1,) + m.shape[-2:])[..., None]
        m = repeat_to_batch(as_numpy(resize(mx.array(m), sh, sw, "bilinear")), src.shape[0])
    visible_w, visible_h = dw - left + min(0, x), dh - top + min(0, y)
    m = m[:, :visible_h, :visible_w]
    region = dest[:, top:top + sh, left:left + sw]
    dest[:, top:top + sh, left:left + sw] = m * src[:, :visible_h, :visible_w] + (1.0 - m) * region
    return mx.array(dest)


def _feather_ramp(n: int, feather: int, at_start: bool, at_end: bool) -> np.ndarray:
    """LatentComposite's weights along one axis: (t+1)/feather on the t-th position from a side that lies
    inside the destination. Python slicing as ComfyUI's loop, so a feather wider than n behaves alike."""
    ramp = np.ones(n, np.float32)
    for t in range(feather):
        weight = (1.0 / feather) * (t + 1)
        if at_start:
            ramp[t:t + 1] *= weight
        if at_end:
            ramp[n - 1 - t:n - t] *= weight
    return ramp


def paste_feathered(samples_to, samples_from, x: int, y: int, feather: int) -> mx.array:
    """LatentComposite (all in latent units): `samples_from` pasted at (x, y), cut off at the edges; with
    `feather`, it fades in linearly over that many rows/columns from each side not on the border."""
    to, frm = as_numpy(samples_to), as_numpy(samples_from)
    _, h_to, w_to, _ = to.shape
    if x >= w_to or y >= h_to:
        return mx.array(to)  # entirely outside
    if frm.shape[0] not in (1, to.shape[0]):
        raise ValueError(f"cannot paste a batch of {frm.shape[0]} latents onto a batch of {to.shape[0]}")
    frm = frm[:, :h_to - y, :w_to - x]
    _, h, w, _ = frm.shape
    if feather == 0:
        to[:, y:y + h, x:x + w] = frm
        return mx.array(to)
    rows = _feather_ramp(h, feather, y != 0, y + h < h_to)
    cols = _feather_ramp(w, feather, x != 0, x + w < w_to)
    m = (rows[:, None] * cols[None, :])[None, :, :, None]
    to[:, y:y + h, x:x + w] = frm * m + to[:, y:y + h, x:x + w] * (1.0 - m)
    return mx.array(to)


def blend(samples1, samples2, blend_factor: float) -> mx.array:
    """LatentBlend: samples1 * f + samples2 * (1 - f), samples2 first resized (bicubic, centre-cropped)
    to samples1's size when the shapes differ."""
    a, b = as_numpy(samples1), as_numpy(samples2)
    if a.shape[1:3] != b.shape[1:3]:
        b = as_numpy(scale(b, a.shape[2], a.shape[1], "bicubic", "center"))
    if b.shape[0] not in (1, a.shape[0]) and a.shape[0] != 1:
        raise ValueError(f"cannot blend batches of {a.shape[0]} and {b.shape[0]} latents")
    return mx.array(a * blend_factor + b * (1 - blend_factor))


def crop_latent(samples, x: int, y: int, width: int, height: int) -> mx.array:
    """LatentCrop (latent units): the corner kept at least 8 (64 pixels) from the right and bottom."""
    a = as_numpy(samples)
    x, y = min(x, a.shape[2] - 8), min(y, a.shape[1] - 8)
    return mx.array(a[:, y:y + height, x:x + width])


def flip(x, axis: str) -> mx.array:
    """Mirror NHWC arrays: axis "x" flips top-bottom (ComfyUI's "x-axis: vertically"), "y" left-right."""
    a = as_numpy(x)
    return mx.array(np.ascontiguousarray(a[:, ::-1] if axis == "x" else a[:, :, ::-1]))


def rotate(x, quarter_turns: int) -> mx.array:
    """Rotate NHWC arrays clockwise by quarter turns (torch.rot90 over dims [W, H], as LatentRotate)."""
    return mx.array(np.ascontiguousarray(np.rot90(as_numpy(x), quarter_turns, axes=(2, 1))))
