"""ComfyUI's latent transforms: upscale by a factor, batch repeat/select/join, composites, blend, crop,
flip, rotate, add/subtract/multiply. ComfyUI's positions and sizes are in pixels and its latents NCHW;
ours are NHWC (docs/CONTRACTS.md), so each node divides pixels by 8 and hands the NHWC arrays to
sd/image/ops.py. What ComfyUI's nodes carry along unchanged (`batch_index`, `noise_mask`) is carried
along here too."""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx

from graph import LATENT, MASK, Boolean, Choice, Float, Int, node
from nodes.latents import MAX_RESOLUTION
from nodes.values import Latent
from sd.image import ops
from sd.image.resize import LATENT_METHODS

FLIP_METHODS = ("x-axis: vertically", "y-axis: horizontally")
ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")
SEED_BEHAVIORS = ("random", "fixed")


def _with(latent: Latent, samples: mx.array) -> Latent:
    mx.eval(samples)
    return replace(latent, samples=samples)


@node(category="latent", outputs=(LATENT,))
def LatentUpscaleBy(samples: LATENT, upscale_method: Choice(LATENT_METHODS) = "nearest-exact",
                    scale_by: Float(0.01, 8.0) = 1.5):
    """Resize latents by a factor (each side rounded to whole latent pixels)."""
    latent: Latent = samples
    _, h, w, _ = latent.samples.shape
    height, width = round(h * scale_by), round(w * scale_by)
    if height < 1 or width < 1:
        raise ValueError(f"the scaled latent would be {width}x{height}; scale up more")
    return _with(latent, ops.scale(latent.samples, width, height, upscale_method))


@node(category="latent/batch", outputs=(LATENT,))
def RepeatLatentBatch(samples: LATENT, amount: Int(1, 64) = 1):
    """The batch repeated `amount` times.

    A `batch_index` continues past its range for each copy, so every copy gets its own noise."""
    latent: Latent = samples
    x = mx.concatenate([latent.samples] * amount) if amount > 1 else latent.samples
    mask = latent.noise_mask
    if mask is not None and mask.shape[0] > 1:
        mask = mx.concatenate([mask] * amount)
    index = latent.batch_index
    if index is not None:
        offset = max(index) - min(index) + 1
        index = tuple(index) + tuple(i + k * offset for k in range(1, amount) for i in index)
    mx.eval(x)
    return Latent(x, index, mask)


@node(category="latent/batch", outputs=(LATENT,))
def LatentFromBatch(samples: LATENT, batch_index: Int(0, 63) = 0, length: Int(1, 64) = 1):
    """`length` latents from position `batch_index` of the batch (both cut to the batch). They keep their
    place in the batch's noise: the same seed gives them the noise they had in the whole batch."""
    latent: Latent = samples
    n = latent.samples.shape[0]
    start = min(n - 1, batch_index)
    length = min(n - start, length)
    x = latent.samples[start:start + length]
    mask = latent.noise_mask
    if mask is not None and mask.shape[0] > 1:
        if mask.shape[0] < n:
            mask = mx.concatenate([mask] * math.ceil(n / mask.shape[0]))[:n]
        mask = mask[start:start + length]
    if latent.batch_index is None:
        index = tuple(range(start, start + length))
    else:
        index = tuple(latent.batch_index[start:start + length])
    mx.eval(x)
    return Latent(x, index, mask)


@node(category="latent", outputs=(LATENT,))
def LatentComposite(samples_to: LATENT, samples_from: LATENT, x: Int(0, MAX_RESOLUTION) = 0,
                    y: Int(0, MAX_RESOLUTION) = 0, feather: Int(0, MAX_RESOLUTION) = 0):
    """Paste `samples_from` into `samples_to` at (x, y) pixels (÷8), optionally feathered.

    It is cut off at the edges; `feather` pixels (÷8) fade it in linearly from every side that is not on
    the border."""
    to: Latent = samples_to
    out = ops.paste_feathered(to.samples, samples_from.samples, x // 8, y // 8, feather // 8)
    return _with(to, out)


@node(category="latent", outputs=(LATENT,))
def LatentCompositeMasked(destination: LATENT, source: LATENT, x: Int(0, MAX_RESOLUTION) = 0,
                          y: Int(0, MAX_RESOLUTION) = 0, resize_source: Boolean() = False, mask: MASK = None):
    """Paste `source` into `destination` at (x, y) pixels (÷8), blended by an optional mask.

    The mask (pixels, 1 = source) is resized to the source; resize_source first scales the source to
    the destination's size."""
    dest: Latent = destination
    out = ops.composite(dest.samples, source.samples, x, y, mask, 8, resize_source)
    return _with(dest, out)


@node(category="_for_testing", outputs=(LATENT,))
def LatentBlend(samples1: LATENT, samples2: LATENT, blend_factor: Float(0.0, 1.0) = 0.5):
    """samples1 * blend_factor + samples2 * (1 - blend_factor).

    samples2 is first resized (bicubic, centre crop) to samples1's size when the shapes differ."""
    first: Latent = samples1
    return _with(first, ops.blend(first.samples, samples2.samples, blend_factor))


@node(category="latent/transform", outputs=(LATENT,))
def LatentCrop(samples: LATENT, width: Int(64, MAX_RESOLUTION) = 512, height: Int(64, MAX_RESOLUTION) = 512,
               x: Int(0, MAX_RESOLUTION) = 0, y: Int(0, MAX_RESOLUTION) = 0):
    """The width x height pixel window (÷8) at (x, y), its corner kept 64 pixels inside the latent.
    (A noise mask is passed on uncropped, as ComfyUI does.)"""
    latent: Latent = samples
    return _with(latent, ops.crop_latent(latent.samples, x // 8, y // 8, width // 8, height // 8))


@node(category="latent/transform", outputs=(LATENT,))
def LatentFlip(samples: LATENT, flip_method: Choice(FLIP_METHODS) = FLIP_METHODS[0]):
    """Mirror latents ("x-axis: vertically" turns them upside down, "y-axis: horizontally" mirrors them)."""
    latent: Latent = samples
    return _with(latent, ops.flip(latent.samples, flip_method[0]))


@node(category="latent/transform", outputs=(LATENT,))
def LatentRotate(samples: LATENT, rotation: Choice(ROTATIONS) = "none"):
    """Rotate latents clockwise by 90, 180 or 270 degrees."""
    latent: Latent = samples
    turns = ROTATIONS.index(rotation)
    if turns == 0:
        return latent
    return _with(latent, ops.rotate(latent.samples, turns))


@node(category="latent/batch", outputs=(LATENT,))
def LatentBatch(samples1: LATENT, samples2: LATENT):
    """One batch of samples1 then samples2 (samples2 resized, bilinear with centre crop, when the sizes
    differ). Each keeps its batch positions, so the noise of each part is what it had alone."""
    first: Latent = samples1
    second: Latent = samples2
    a = first.samples
    b = mx.array(ops.match_shape(second.samples, (second.samples.shape[0],) + tuple(a.shape[1:])))
    index = tuple(first.batch_index or range(a.shape[0])) + tuple(second.batch_index or range(b.shape[0]))
    return _with(replace(first, batch_index=index), mx.concatenate([a, b]))


@node(category="latent/advanced", outputs=(LATENT,))
def LatentBatchSeedBehavior(samples: LATENT, seed_behavior: Choice(SEED_BEHAVIORS) = "fixed"):
    """fixed: every latent of the batch gets the noise of the first one; random: each its own (the batch
    positions are dropped)."""
    latent: Latent = samples
    if seed_behavior == "random":
        return replace(latent, batch_index=None)
    first = (latent.batch_index or (0,))[0]
    return replace(latent, batch_index=(first,) * latent.samples.shape[0])


@node(category="latent/advanced", outputs=(LATENT,))
def LatentAdd(samples1: LATENT, samples2: LATENT):
    """samples1 + samples2 (samples2 resized to samples1's size and its batch repeated to fit)."""
    first: Latent = samples1
    a = first.samples
    return _with(first, a + mx.array(ops.match_shape(samples2.samples, a.shape)))


@node(category="latent/advanced", outputs=(LATENT,))
def LatentSubtract(samples1: LATENT, samples2: LATENT):
    """samples1 - samples2 (samples2 resized to samples1's size and its batch repeated to fit)."""
    first: Latent = samples1
    a = first.samples
    return _with(first, a - mx.array(ops.match_shape(samples2.samples, a.shape)))


@node(category="latent/advanced", outputs=(LATENT,))
def LatentMultiply(samples: LATENT, multiplier: Float(-10.0, 10.0) = 1.0):
    """samples * multiplier."""
    latent: Latent = samples
    return _with(latent, latent.samples * multiplier)
