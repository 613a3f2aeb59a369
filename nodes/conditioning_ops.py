"""ComfyUI's conditioning operations: combine, concatenate, average, zero out, areas, masks, timestep ranges.

They only rearrange entries and set options (nodes/values.py's CondEntry); what the options mean is the
denoiser's business (sd/sampling/conds.py). Areas are stored as ComfyUI stores them: (h, w, y, x) in latent
pixels (the pixel sizes // 8), or ("percentage", h, w, y, x).
"""

from __future__ import annotations

import mlx.core as mx

from graph import CONDITIONING, MASK, Choice, Float, Int, node
from nodes.latents import MAX_RESOLUTION
from nodes.values import CondEntry, Conditioning


def _one_from(conditioning: Conditioning, node_name: str, ctx) -> CondEntry:
    if len(conditioning) > 1 and ctx is not None:
        ctx.log(f"{node_name}: conditioning_from has {len(conditioning)} entries; only the first is used "
                "(as in ComfyUI)")
    return conditioning.entries[0]


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningCombine(conditioning_1: CONDITIONING, conditioning_2: CONDITIONING):
    """Both conditionings' entries together: the sampler evaluates each and averages their predictions by
    weight (how areas and masks compose)."""
    return Conditioning(entries=conditioning_1.entries + conditioning_2.entries)


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningConcat(conditioning_to: CONDITIONING, conditioning_from: CONDITIONING, ctx=None):
    """Append conditioning_from's tokens to each entry of conditioning_to (one longer prompt, each part
    encoded on its own; only conditioning_from's first entry is used)."""
    source = _one_from(conditioning_from, "ConditioningConcat", ctx).cond
    out = []
    for entry in conditioning_to:
        if 1 not in (source.shape[0], entry.cond.shape[0]) and source.shape[0] != entry.cond.shape[0]:
            raise ValueError(f"cannot append a batch of {source.shape[0]} to one of {entry.cond.shape[0]}")
        batch = max(source.shape[0], entry.cond.shape[0])
        a = mx.broadcast_to(entry.cond, (batch, *entry.cond.shape[1:]))
        b = mx.broadcast_to(source, (batch, *source.shape[1:])).astype(a.dtype)
        out.append(CondEntry(mx.concatenate([a, b], axis=1), entry.pooled, entry.options))
    return _evaluated(Conditioning(entries=out))


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningAverage(conditioning_to: CONDITIONING, conditioning_from: CONDITIONING,
                        conditioning_to_strength: Float(0.0, 1.0) = 1.0, ctx=None):
    """Blend each entry of conditioning_to with conditioning_from's first entry: to * strength +
    from * (1 - strength), over conditioning_to's token length (from is cut or zero-padded to it)."""
    source = _one_from(conditioning_from, "ConditioningAverage", ctx)
    w = conditioning_to_strength
    out = []
    for entry in conditioning_to:
        target = entry.cond
        src = source.cond[:, : target.shape[1]]
        if src.shape[1] < target.shape[1]:
            pad = mx.zeros((src.shape[0], target.shape[1] - src.shape[1], src.shape[2]), dtype=src.dtype)
            src = mx.concatenate([src, pad], axis=1)
        blended = target * w + src * (1.0 - w)
        pooled_to = entry.pooled if entry.pooled is not None else source.pooled
        pooled = source.pooled
        if source.pooled is not None and pooled_to is not None:
            pooled = pooled_to * w + source.pooled * (1.0 - w)
        out.append(CondEntry(blended, pooled, entry.options))
    return _evaluated(Conditioning(entries=out))


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningZeroOut(conditioning: CONDITIONING):
    """Every entry's encoding (and pooled output) set to zeros, options kept: an empty negative as some
    models were trained with."""
    return _evaluated(conditioning.map(lambda e: CondEntry(
        mx.zeros_like(e.cond), None if e.pooled is None else mx.zeros_like(e.pooled), e.options)))


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningSetArea(conditioning: CONDITIONING, width: Int(64, MAX_RESOLUTION) = 64,
                        height: Int(64, MAX_RESOLUTION) = 64, x: Int(0, MAX_RESOLUTION) = 0,
                        y: Int(0, MAX_RESOLUTION) = 0, strength: Float(0.0, 10.0) = 1.0):
    """Apply the conditioning to a rectangle only (pixels; used in multiples of 8): area composition.
    Combine it with a full-image conditioning (ConditioningCombine) for the rest."""
    return conditioning.with_options(area=(height // 8, width // 8, y // 8, x // 8), strength=strength,
                                     set_area_to_bounds=False)


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningSetAreaPercentage(conditioning: CONDITIONING, width: Float(0.0, 1.0) = 1.0,
                                  height: Float(0.0, 1.0) = 1.0, x: Float(0.0, 1.0) = 0.0,
                                  y: Float(0.0, 1.0) = 0.0, strength: Float(0.0, 10.0) = 1.0):
    """ConditioningSetArea with the rectangle as fractions of the image (resolved against the latent's size
    when sampling)."""
    return conditioning.with_options(area=("percentage", height, width, y, x), strength=strength,
                                     set_area_to_bounds=False)


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningSetAreaStrength(conditioning: CONDITIONING, strength: Float(0.0, 10.0) = 1.0):
    """Set the weight of the conditioning's prediction where it applies."""
    return conditioning.with_options(strength=strength)


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningSetMask(conditioning: CONDITIONING, mask: MASK, strength: Float(0.0, 10.0) = 1.0,
                        set_cond_area: Choice(("default", "mask bounds")) = "default"):
    """Apply the conditioning where the mask is (weighted by it, times strength). "mask bounds" evaluates
    only the mask's bounding box, which is faster and lets a small region get full detail."""
    mask = mask if mask.ndim >= 3 else mask[None]
    return conditioning.with_options(mask=mask.astype(mx.float32),
                                     set_area_to_bounds=set_cond_area != "default", mask_strength=strength)


@node(category="conditioning", outputs=(CONDITIONING,))
def ConditioningSetTimestepRange(conditioning: CONDITIONING, start: Float(0.0, 1.0) = 0.0,
                                 end: Float(0.0, 1.0) = 1.0):
    """Use the conditioning only for part of sampling: from `start` to `end` as fractions of the schedule
    (0 = the first, noisiest step). Combine two to switch prompts midway."""
    return conditioning.with_options(start_percent=start, end_percent=end)


def _evaluated(c: Conditioning) -> Conditioning:
    mx.eval([a for e in c.entries for a in (e.cond, e.pooled) if a is not None])
    return c
