"""Run an upscale model over an image in overlapping tiles, as ComfyUI's ImageUpscaleWithModel does.

ComfyUI (comfy/utils.py `tiled_scale_multidim`, v0.3.64 and later; comfy_extras/nodes_upscale_model.py):
tiles of 512 pixels overlapping by 32; an image that fits in one tile runs whole. Tile starts step by
tile - overlap up to side - overlap, so the last tile of a row may be narrower. Each upscaled tile is weighted
by a mask that ramps over `round(overlap * scale)` pixels at every edge ((t+1)/feather at the t-th pixel
from the edge; the ramp is left out along a side the mask is not longer than), summed, and divided by the
summed weights. On an out-of-memory error the tile is halved and the whole image redone, down to 128.
Each tile is the model's own call as spandrel makes it: padded to the sizes the model accepts, clamped to
[0, 1], cropped back. The sums live in host memory (ComfyUI's output device is the CPU too), so only one
tile's activations are on the device at a time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from sd.models.pixels import pad_to_multiple

TILE = 512
OVERLAP = 32
MIN_TILE = 128

# What MLX's allocators say when memory runs out (Metal, CUDA, CPU), lower-cased.
_OOM_MARKERS = ("unable to allocate", "failed to allocate", "out of memory", "insufficient memory",
                "greater than the maximum allowed buffer size", "bad_alloc", "outofmemory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for MLX's allocation failures (RuntimeError) and Python's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)


def run_model(model, x: mx.array) -> mx.array:
    """One call of the model on x [B, H, W, C] in [0, 1]: padded to `model.pad_multiple`, clamped to [0, 1],
    cropped to H*scale x W*scale; float32. `model`: an upscale model or its sd.accel.compiled.FastUpscaler."""
    _, h, w, _ = x.shape
    y = model(pad_to_multiple(x, model.pad_multiple).astype(model.dtype))
    return mx.clip(y[:, :h * model.scale, :w * model.scale].astype(mx.float32), 0.0, 1.0)


def _ramp(length: int, feather: int) -> np.ndarray:
    weights = np.ones(length, dtype=np.float32)
    if feather >= length:
        return weights
    for t in range(feather):
        a = np.float32((t + 1) / feather)
        weights[t] *= a
        weights[length - 1 - t] *= a
    return weights


def _starts(side: int, tile: int, overlap: int) -> list[int]:
    if side <= tile:
        return [0]
    return [max(0, min(side - overlap, p)) for p in range(0, side - overlap, tile - overlap)]


def tile_count(height: int, width: int, tile: int = TILE, overlap: int = OVERLAP) -> int:
    if height <= tile and width <= tile:
        return 1
    return len(_starts(height, tile, overlap)) * len(_starts(width, tile, overlap))


def tiled_scale(fn: Callable[[mx.array], mx.array], image: mx.array, scale: int, tile: int = TILE,
                overlap: int = OVERLAP, progress: Callable[[], None] | None = None) -> mx.array:
    """fn over image [B, H, W, C] in overlapping tiles, blended as ComfyUI blends -> [B, H*s, W*s, C']."""
    outputs = []
    for b in range(image.shape[0]):
        one = image[b:b + 1]
        _, h, w, _ = one.shape
        if h <= tile and w <= tile:  # one tile: the model's output as it is, left on the device
            out = fn(one).astype(mx.float32)
            mx.eval(out)
            outputs.append(out)
            if progress:
                progress()
            continue
        total = weight = None
        feather = round(overlap * scale)
        for y, x in itertools.product(_starts(h, tile, overlap), _starts(w, tile, overlap)):
            piece = fn(one[:, y:y + min(tile, h - y), x:x + min(tile, w - x)])
            mx.eval(piece)
            piece = np.array(piece.astype(mx.float32))
            if total is None:
                total = np.zeros((1, h * scale, w * scale, piece.shape[-1]), dtype=np.float32)
                weight = np.zeros((1, h * scale, w * scale, 1), dtype=np.float32)
            ph, pw = piece.shape[1:3]
            mask = (_ramp(ph, feather)[:, None] * _ramp(pw, feather)[None, :])[None, :, :, None]
            oy, ox = y * scale, x * scale
            total[:, oy:oy + ph, ox:ox + pw] += piece * mask
            weight[:, oy:oy + ph, ox:ox + pw] += mask
            if progress:
                progress()
        outputs.append(mx.array(total / weight))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)


def _report(progress: Callable[[int, int], None], counter: itertools.count, total: int) -> None:
    progress(next(counter), total)


def upscale_image(model, image: mx.array, tile: int = TILE, overlap: int = OVERLAP, min_tile: int = MIN_TILE,
                  progress: Callable[[int, int], None] | None = None,
                  log: Callable[[str], None] = lambda msg: None) -> mx.array:
    """The upscaled image [B, H*s, W*s, C] in [0, 1] (float32); tiles halve on out-of-memory errors."""
    while True:
        steps = image.shape[0] * tile_count(image.shape[1], image.shape[2], tile, overlap)
        step = functools.partial(_report, progress, itertools.count(1), steps) if progress else None
        try:
            out = tiled_scale(lambda x: run_model(model, x), image, model.scale, tile, overlap, step)
            return mx.clip(out, 0.0, 1.0)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e) or tile // 2 < min_tile:
                raise
            mx.clear_cache()
            log(f"out of memory with {tile}-pixel tiles; retrying with {tile // 2}")
            tile //= 2
