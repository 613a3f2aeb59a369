"""VAE decode in overlapping tiles, so large images (1024x1024 and up) fit in a 16 GB Mac's memory.

`decode(vae, latent)` is what callers should use: below `TILE_THRESHOLD` latent pixels it is exactly
`vae.decode(latent)` (bit-identical, same graph); above it, `decode_tiled` decodes latent tiles of
`tile` x `tile` with `overlap` latent pixels shared between neighbours and blends the decoded tiles with
linear ramps across each overlap. Every tile has the same shape (the last row/column of tiles is shifted
back to end at the border), so a compiled decoder is traced once.

Tiling is an approximation where the image is larger than one tile: the decoder's mid-block attention then
sees one tile instead of the whole latent, as with ComfyUI's "VAE Decode (Tiled)".

The untiled decode's peak memory grows with the pixel count, the tiled one stays at the tile's
(docs/performance.md, "Tiled VAE decode").
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

# Latent pixels above which `decode` tiles: 96x96 latent = 768x768 image decodes untiled; 1024x1024 tiles.
TILE_THRESHOLD = 96 * 96
DEFAULT_TILE = 64      # latent pixels per tile side (512 image pixels)
DEFAULT_OVERLAP = 16   # latent pixels shared by neighbouring tiles (128 image pixels)
SCALE = 8              # SD1.x VAE: image pixels per latent pixel


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(length: int, starts: list[int], tile: int, index: int, scale: int) -> mx.array:
    """Blend weights [tile*scale] of tile `index` along one axis: ramps up over the overlap with the previous
    tile and down over the overlap with the next one; 1 elsewhere (and at the image borders)."""
    n = tile * scale
    w = mx.ones((n,), dtype=mx.float32)
    pos = mx.arange(n, dtype=mx.float32)
    if index > 0:
        ov = (starts[index - 1] + tile - starts[index]) * scale
        w = mx.minimum(w, (pos + 0.5) / ov)
    if index < len(starts) - 1:
        ov = (starts[index] + tile - starts[index + 1]) * scale
        w = mx.minimum(w, (n - pos - 0.5) / ov)
    return w


Progress = Callable[[int, int], None]  # (tiles done, tiles in all), after each tile


def decode_tiled(decode_fn: Callable[[mx.array], mx.array], latent: mx.array, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, scale: int = SCALE,
                 progress: Progress | None = None) -> mx.array:
    """Decode `latent` [B,h,w,C] tile by tile with `decode_fn`; returns [B, h*scale, w*scale, 3] float32.

    A latent that fits in one tile is decoded whole: `decode_fn(latent)` unchanged.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    b, h, w, _ = latent.shape
    if h <= tile and w <= tile:
        return decode_fn(latent)
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _starts(h, th, overlap), _starts(w, tw, overlap)
    out = mx.zeros((b, h * scale, w * scale, 3), dtype=mx.float32)
    total = mx.zeros((1, h * scale, w * scale, 1), dtype=mx.float32)
    for iy, y in enumerate(ys):
        wy = _ramp(h, ys, th, iy, scale)
        for ix, x in enumerate(xs):
            wx = _ramp(w, xs, tw, ix, scale)
            weight = (wy[:, None] * wx[None, :])[None, :, :, None]
            piece = decode_fn(latent[:, y:y + th, x:x + tw, :]).astype(mx.float32)
            ys_, xs_ = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            out[:, ys_, xs_, :] = out[:, ys_, xs_, :] + piece * weight
            total[:, ys_, xs_, :] = total[:, ys_, xs_, :] + weight
            mx.eval(out, total)  # one tile's activations alive at a time
            if progress is not None:
                progress(iy * len(xs) + ix + 1, len(ys) * len(xs))
    return out / total


def needs_tiling(latent_shape, threshold: int = TILE_THRESHOLD) -> bool:
    _, h, w, _ = latent_shape
    return h * w > threshold


def decode(vae, latent: mx.array, decode_fn: Callable[[mx.array], mx.array] | None = None,
           threshold: int = TILE_THRESHOLD, tile: int = DEFAULT_TILE,
           overlap: int = DEFAULT_OVERLAP, progress: Progress | None = None) -> mx.array:
    """`vae.decode(latent)` (or `decode_fn`), tiled only when the latent has more than `threshold` pixels;
    `progress` hears of each tile (an untiled decode is one step)."""
    fn = decode_fn or vae.decode
    if not needs_tiling(latent.shape, threshold):
        return fn(latent)
    return decode_tiled(fn, latent, tile, overlap, progress=progress)
