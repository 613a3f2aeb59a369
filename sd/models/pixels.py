"""Pixel rearrangements the upscale models share, NHWC, with PyTorch's element order.

`pixel_shuffle` / `pixel_unshuffle` order channels as torch.nn.functional.pixel_(un)shuffle does on NCHW
(channel c*r*r + i*r + j <-> pixel (h*r + i, w*r + j) of channel c), so weights trained in PyTorch apply as
they are.
"""

from __future__ import annotations

import mlx.core as mx


def upsample_nearest(x: mx.array, factor: int) -> mx.array:
    """Nearest-neighbour upsampling by an integer factor (torch's `interpolate(mode="nearest")`)."""
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """[B, H, W, C*r*r] -> [B, H*r, W*r, C]."""
    b, h, w, cr = x.shape
    c = cr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


def pixel_unshuffle(x: mx.array, r: int) -> mx.array:
    """[B, H*r, W*r, C] -> [B, H, W, C*r*r] (the inverse of `pixel_shuffle`)."""
    b, hr, wr, c = x.shape
    h, w = hr // r, wr // r
    x = x.reshape(b, h, r, w, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h, w, c * r * r)


def _pad_axis(x: mx.array, axis: int, pad: int) -> mx.array:
    """Append `pad` entries along `axis`: reflected (without the edge) as far as the size allows, then the
    edge repeated, as spandrel pads an image to a size its model accepts."""
    if pad <= 0:
        return x
    size = x.shape[axis]
    reflect = min(pad, size - 1)
    parts = [x]
    if reflect:
        index = mx.arange(size - 2, size - 2 - reflect, -1)
        parts.append(mx.take(x, index, axis=axis))
    if pad > reflect:
        edge = mx.take(x, mx.array([size - 1]), axis=axis)
        shape = list(x.shape)
        shape[axis] = pad - reflect
        parts.append(mx.broadcast_to(edge, shape))
    return mx.concatenate(parts, axis=axis)


def pad_to_multiple(x: mx.array, multiple: int) -> mx.array:
    """Pad height and width (bottom and right) up to multiples of `multiple`."""
    _, h, w, _ = x.shape
    x = _pad_axis(x, 1, -h % multiple)
    return _pad_axis(x, 2, -w % multiple)
