"""ComfyUI's tiled VAE decode and encode ("VAE Decode (Tiled)" / "VAE Encode (Tiled)"), NHWC.

ComfyUI's `comfy.utils.tiled_scale` runs a function over overlapping tiles and blends the results: tiles
start every `tile - overlap` pixels (the last ones shorter where the input ends), each result is weighted by
a mask that ramps linearly over `overlap * scale` output pixels at *every* edge of the tile (at the image
border too: the normalisation by the summed masks makes that harmless), and the weighted sum is divided by
the summed masks. Its `VAE.decode_tiled_` / `encode_tiled_` average three such passes, with tiles of
(w, h), (w/2, 2h) and (2w, h/2), so the seams of one pass fall inside the tiles of the others.

This is not sd/image/tiling.py's decode (what VAEDecode does above a size, one pass with one tile shape so
a compiled decoder is traced once); the nodes that name ComfyUI's tiled nodes compute ComfyUI's result.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

Fn = Callable[[mx.array], mx.array]


def _positions(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    return list(range(0, length - overlap, tile - overlap))


def _edge_ramp(n: int, feather: int) -> mx.array:
    """[n] weights: (t+1)/feather over the first and last `feather` entries (multiplied where both), else 1;
    all 1 when the ramps would not fit (feather >= n), as ComfyUI skips them."""
    if feather <= 0 or feather >= n:
        return mx.ones((n,), dtype=mx.float32)
    i = mx.arange(n, dtype=mx.float32)
    up = mx.minimum((i + 1) / feather, 1.0)
    down = mx.minimum((n - i) / feather, 1.0)
    return up * down


def tiled_scale(fn: Fn, x: mx.array, tile_h: int, tile_w: int, overlap: int, scale: float,
                out_channels: int) -> mx.array:
    """`fn` over overlapping tiles of `x` [B, H, W, C], blended: [B, round(H*scale), round(W*scale),
    out_channels] float32 (ComfyUI's tiled_scale with tile=(tile_h, tile_w))."""
    if tile_h <= overlap and x.shape[1] > tile_h or tile_w <= overlap and x.shape[2] > tile_w:
        raise ValueError(f"overlap {overlap} must be smaller than the tile ({tile_w}x{tile_h})")
    b, h, w, _ = x.shape
    if h <= tile_h and w <= tile_w:
        return fn(x).astype(mx.float32)
    out = mx.zeros((b, round(h * scale), round(w * scale), out_channels), dtype=mx.float32)
    total = mx.zeros((1, out.shape[1], out.shape[2], 1), dtype=mx.float32)
    feather = round(overlap * scale)
    for y in _positions(h, tile_h, overlap):
        py = max(0, min(h - overlap, y))
        for x0 in _positions(w, tile_w, overlap):
            px = max(0, min(w - overlap, x0))
            piece = fn(x[:, py:py + min(tile_h, h - py), px:px + min(tile_w, w - px), :]).astype(mx.float32)
            ph, pw = piece.shape[1], piece.shape[2]
            mask = (_edge_ramp(ph, feather)[:, None] * _edge_ramp(pw, feather)[None, :])[None, :, :, None]
            oy, ox = round(py * scale), round(px * scale)
            out[:, oy:oy + ph, ox:ox + pw, :] = out[:, oy:oy + ph, ox:ox + pw, :] + piece * mask
            total[:, oy:oy + ph, ox:ox + pw, :] = total[:, oy:oy + ph, ox:ox + pw, :] + mask
            mx.eval(out, total)  # one tile's activations alive at a time
    return out / total


def decode_tiled(decode: Fn, latent: mx.array, tile: int, overlap: int, scale: int = 8) -> mx.array:
    """ComfyUI's VAE.decode_tiled_: latent [B,h,w,4] -> VAE output [B,H,W,3] (in [-1, 1], unclamped),
    the mean of three passes of `tile` x `tile` latent pixels and the two half/double shapes."""
    passes = ((tile * 2, tile // 2), (tile // 2, tile * 2), (tile, tile))  # (tile_h, tile_w) in that order
    total = None
    for th, tw in passes:
        one = tiled_scale(decode, latent, th, tw, overlap, scale, 3)
        total = one if total is None else total + one
    return total / 3.0


def encode_tiled(encode: Fn, image: mx.array, tile: int, overlap: int, scale: int = 8,
                 latent_channels: int = 4) -> mx.array:
    """ComfyUI's VAE.encode_tiled_: image [B,H,W,3] in [-1, 1] -> latent [B,H/8,W/8,4], the mean of three
    passes of `tile` x `tile` pixels and the two half/double shapes."""
    passes = ((tile, tile), (tile // 2, tile * 2), (tile * 2, tile // 2))
    total = None
    for th, tw in passes:
        one = tiled_scale(encode, image, th, tw, overlap, 1.0 / scale, latent_channels)
        total = one if total is None else total + one
    return total / 3.0
