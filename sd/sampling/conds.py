"""Conditioning entries as the denoiser sees them: ComfyUI's `process_conds` and `calc_cond_batch`.

A conditioning is a list of entries, each a text encoding [1 or B, L, C] plus options with ComfyUI's keys:

    area                (h, w, y, x) in latent pixels, or ("percentage", h, w, y, x): fractions of the latent
    strength            weight of the entry's prediction (default 1)
    mask, mask_strength [Bm, H, W] (or [H, W]) weights, resized bilinearly to the latent; times mask_strength
    set_area_to_bounds  with a mask: evaluate only the mask's bounding box (at least 8x8)
    start_percent, end_percent   the part of the schedule the entry is active in (0 = start)
    (timestep_start, timestep_end: the same as sigmas, written by `resolve` from the percents)

Any other option whose value has a method `unet_extras(x, timestep, context, areas) -> UNetExtras` is an
*extras source* (ControlNet, inpainting concat, GLIGEN): it is asked once per UNet call for what the call
adds (sd/models/unet_extras.py), with the call's batched input and each chunk's area. Entries share a call
only when they have the same sources (by identity), as ComfyUI requires of `control` and `patches`.

Per step, each entry active at sigma is evaluated on its area's crop of x, its prediction weighted by
`mult` (mask * strength, or strength feathered over 8 latent pixels at area edges that are inside the
image) and the weighted sum divided by the summed weights (+1e-37), per side (positive, negative).
Entries are batched into one UNet call when their crops have one shape and their token lengths pad to a
common length (LCM / shortest <= 4, ComfyUI's CONDCrossAttn).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from sd.models.unet_extras import NO_EXTRAS, UNetExtras

_MAX_TOKEN_PADDING = 4  # ComfyUI's limit on LCM / shortest length when batching conds
_FUZZ = 8  # latent pixels over which an area's inner edges fade in
_EPSILON_COUNT = 1e-37  # ComfyUI's start value of the weight sums

Area = tuple[int, int, int, int]  # h, w, y, x
UNetFn = Callable[..., mx.array]
OPTION_KEYS = ("area", "strength", "mask", "mask_strength", "set_area_to_bounds", "start_percent",
               "end_percent", "timestep_start", "timestep_end", "control_apply_to_uncond")


@dataclass(frozen=True, eq=False)
class Cond:
    """One resolved entry: its context [B, L, C], crop, fixed weights and active sigma range."""

    context: mx.array
    options: Mapping[str, Any]
    area: Area | None = None
    mult: mx.array | None = None  # [1 or B, h, w, 1] weights of the crop; None = plain (weight 1 everywhere)
    sigma_start: float | None = None  # active while sigma <= sigma_start
    sigma_end: float | None = None  # ... and sigma >= sigma_end
    sources: tuple = field(default=())  # extras sources (see the module doc)

    def active(self, sigma: float) -> bool:
        return not ((self.sigma_start is not None and sigma > self.sigma_start)
                    or (self.sigma_end is not None and sigma < self.sigma_end))

    def crop(self, x: mx.array) -> mx.array:
        if self.area is None:
            return x
        h, w, y, x0 = self.area
        return x[:, y : y + h, x0 : x0 + w, :]


def as_entries(conditioning, batch: int) -> list[tuple[mx.array, Mapping[str, Any]]]:
    """(context [B, L, C], options) pairs from an array, a list of arrays or a list of (array, options)."""
    items = [conditioning] if isinstance(conditioning, (mx.array, np.ndarray)) else list(conditioning)
    out = []
    for item in items:
        cond, options = (item, {}) if isinstance(item, (mx.array, np.ndarray)) else item
        cond = cond if isinstance(cond, mx.array) else mx.array(cond)
        if cond.shape[0] not in (1, batch):
            raise ValueError(f"conditioning batch {cond.shape[0]} does not match the latent batch {batch}")
        out.append((mx.repeat(cond, batch, axis=0) if cond.shape[0] != batch else cond, dict(options or {})))
    return out


def percent_to_sigma(ms, percent: float) -> float:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma: 0 = the start of the schedule (any sigma)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(ms.sigma(np.float32((1.0 - percent) * 999.0)))


def _mask_bounds(mask: np.ndarray) -> Area:
    """set_area_to_bounds: the bounding box of the mask's non-zero pixels over the batch, at least 8x8."""
    bounds = np.abs(mask).max(axis=0)
    ys, xs = np.nonzero(bounds)
    if len(ys) == 0:
        return (8, 8, 0, 0)  # an empty mask: the smallest area (it weighs nothing anyway)
    return (max(8, int(ys.max() - ys.min() + 1)), max(8, int(xs.max() - xs.min() + 1)), int(ys.min()),
            int(xs.min()))


def _resolve_options(options: Mapping[str, Any], hw: tuple[int, int], ms) -> dict[str, Any]:
    """resolve_areas_and_cond_masks + calculate_start_end_timesteps for one entry."""
    from sd.image.resize import resize

    opts = dict(options)
    area = opts.get("area")
    if area is not None and area[0] == "percentage":
        _, ph, pw, py, px = area
        opts["area"] = (max(1, round(ph * hw[0])), max(1, round(pw * hw[1])), round(py * hw[0]),
                        round(px * hw[1]))
    mask = opts.get("mask")
    if mask is not None:
        mask = mask if isinstance(mask, mx.array) else mx.array(np.asarray(mask, np.float32))
        mask = mask.astype(mx.float32)
        if mask.ndim == 2:
            mask = mask[None]
        if tuple(mask.shape[1:]) != hw:
            mask = resize(mask[..., None], hw[0], hw[1], "bilinear")[..., 0]
        if opts.get("set_area_to_bounds", False):
            opts["area"] = _mask_bounds(np.array(mask))
        opts["mask"] = mask
    if "start_percent" in opts:
        opts["timestep_start"] = percent_to_sigma(ms, opts["start_percent"])
    if "end_percent" in opts:
        opts["timestep_end"] = percent_to_sigma(ms, opts["end_percent"])
    return opts


def _clip_area(area: Sequence[int] | None, hw: tuple[int, int]) -> Area | None:
    """get_area_and_mult's clipping of an area to the latent (its offsets are kept)."""
    if area is None:
        return None
    h, w, y, x = (int(v) for v in area)
    clipped = (min(hw[0] - y, h), min(hw[1] - x, w), y, x)
    if min(clipped[:2]) <= 0 or min(y, x) < 0:
        raise ValueError(f"a conditioning area of {h}x{w} at y={y}, x={x} (latent pixels: image pixels / 8) "
                         f"lies outside the {hw[0]}x{hw[1]} latent")
    return clipped


def _mult(opts: Mapping[str, Any], area: Area | None, hw: tuple[int, int], batch: int) -> mx.array | None:
    """get_area_and_mult's weights of the crop [1 or B, h, w, 1], in ComfyUI's float32 order of products."""
    strength = opts.get("strength", 1.0)
    mask = opts.get("mask")
    if mask is None and area is None:
        return None if strength == 1.0 else mx.full((1, *hw, 1), strength, dtype=mx.float32)
    h, w, y, x = area if area is not None else (*hw, 0, 0)
    if mask is not None:
        m = np.array(mask, dtype=np.float32)[:batch, y : y + h, x : x + w] * np.float32(
            opts.get("mask_strength", 1.0))
        if m.shape[0] not in (1, batch):
            m = np.tile(m, (batch // m.shape[0], 1, 1))
        return mx.array((m * np.float32(strength))[..., None])
    m = np.full((1, h, w), strength, dtype=np.float32)
    for axis, (size, offset, full) in enumerate(((h, y, hw[0]), (w, x, hw[1])), start=1):
        rr = min(_FUZZ, size // 4)
        line = np.moveaxis(m, axis, 0)  # a view: scaling its rows scales m's
        if offset != 0:
            for t in range(rr):
                line[t] *= np.float32((1.0 / rr) * (t + 1))
        if size + offset < full:
            for t in range(rr):
                line[size - 1 - t] *= np.float32((1.0 / rr) * (t + 1))
    return mx.array(m[..., None])


def _inside(inner: Area, outer: Area) -> bool:
    return (inner[2] >= outer[2] and inner[3] >= outer[3] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def _add_same_area(others: list[tuple[mx.array, dict]], entry: tuple[mx.array, dict]) -> None:
    """create_cond_with_same_area_if_none: an area entry gets a counterpart on the other side with the same
    options and the text of the smallest entry there that contains its area."""
    area = entry[1].get("area")
    if area is None:
        return
    smallest = None
    for other in others:
        a = other[1].get("area")
        if a is not None:
            if _inside(tuple(area), tuple(a)):
                if smallest is None or smallest[1].get("area") is None:
                    smallest = other
                elif math.prod(smallest[1]["area"][:2]) > math.prod(a[:2]):
                    smallest = other
        elif smallest is None:
            smallest = other
    if smallest is None or tuple(smallest[1].get("area") or ()) == tuple(area):
        return
    others.append((smallest[0], dict(entry[1])))


def _sources(opts: Mapping[str, Any]) -> tuple:
    return tuple(v for k, v in opts.items() if k not in OPTION_KEYS
                 and (hasattr(v, "unet_extras") or hasattr(v, "unet_extras_at")))


def _control_to_uncond(positive: list, negative: list) -> None:
    """apply_empty_x_to_equal_area for "control": when no area-less negative entry has a ControlNet, the
    ControlNets of area-less positive entries marked `control_apply_to_uncond` (ComfyUI's old ControlNetApply)
    go onto the area-less negative entries in turn (with more ControlNets than entries, the last one to reach
    an entry stays: ComfyUI replaces the entry each time)."""
    def whole(opts):
        return opts.get("area") is None

    cnets = [o["control"] for _, o in positive if whole(o) and o.get("control_apply_to_uncond")
             and o.get("control") is not None]
    if any(whole(o) and o.get("control") is not None for _, o in negative):
        return
    others = [(i, e) for i, e in enumerate(negative) if whole(e[1])]
    for k, cnet in enumerate(cnets):
        if not others:
            return
        index, (cond, opts) = others[k % len(others)]
        negative[index] = (cond, {**opts, "control": cnet})


def resolve(sides: Sequence[list[tuple[mx.array, Mapping[str, Any]]]], latent_shape: Sequence[int],
            ms) -> list[list[Cond]]:
    """ComfyUI's process_conds for the sides (positive, negative, ...) of one sampling run."""
    batch, h, w = latent_shape[0], latent_shape[1], latent_shape[2]
    hw = (h, w)
    resolved = [[(c, _resolve_options(o, hw, ms)) for c, o in side] for side in sides]
    for k, side in enumerate(resolved):
        for entry in side:
            for kk, other in enumerate(resolved):
                if kk != k:
                    _add_same_area(other, entry)
    if len(resolved) >= 2:
        _control_to_uncond(resolved[0], resolved[1])
    out = []
    for side in resolved:
        conds = []
        for context, opts in side:
            area = _clip_area(opts.get("area"), hw)
            conds.append(Cond(context, opts, area, _mult(opts, area, hw, batch), opts.get("timestep_start"),
                              opts.get("timestep_end"), _sources(opts)))
        out.append(conds)
    return out


def _can_batch(a: Cond, b: Cond) -> bool:
    """can_concat_cond: one crop shape, the same extras sources, token lengths that pad to a common one."""
    if (a.area or ())[:2] != (b.area or ())[:2] or len(a.sources) != len(b.sources):
        return False
    if any(s is not t for s, t in zip(a.sources, b.sources, strict=True)):
        return False
    la, lb = a.context.shape[1], b.context.shape[1]
    return la == lb or math.lcm(la, lb) // min(la, lb) <= _MAX_TOKEN_PADDING


def _groups(entries: list[Cond]) -> list[list[int]]:
    """Indices of entries sharing one UNet call (each compatible with every other of its group)."""
    groups: list[list[int]] = []
    for index, entry in enumerate(entries):
        for group in groups:
            if all(_can_batch(entries[g], entry) for g in group):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def padded_context(contexts: list[mx.array]) -> mx.array:
    """Contexts repeated to the LCM of their lengths (repeating keys and values leaves attention as it is)."""
    length = math.lcm(*(c.shape[1] for c in contexts))
    return mx.concatenate([mx.tile(c, (1, length // c.shape[1], 1)) for c in contexts], axis=0)


@dataclass
class CondBatcher:
    """calc_cond_batch for fixed sides: `__call__(x, sigma) -> [denoised per side]`. Groups and their padded
    contexts are worked out once per set of active entries and kept (they are the same at most steps)."""

    unet_fn: UNetFn
    sides: list[list[Cond]]
    ms: Any
    extras: UNetExtras = NO_EXTRAS  # what every call carries (model patches such as FreeU)
    call_extras: Callable[[tuple[int, ...]], UNetExtras] | None = None  # per call, from its chunks' sides
    side_ids: tuple[int, ...] | None = None  # what call_extras is told each side is (default: its index)
    _plans: dict = field(default_factory=dict)

    def _plan(self, active: tuple[tuple[int, int], ...]):
        plan = self._plans.get(active)
        if plan is None:
            entries = [self.sides[s][i] for s, i in active]
            groups = _groups(entries)
            plan = [([active[g] for g in group], padded_context([entries[g].context for g in group]))
                    for group in groups]
            self._plans[active] = plan
        return plan

    def _call(self, x_in: mx.array, timestep: float, context: mx.array, conds: list[Cond],
              sides: tuple[int, ...], sigma: float) -> mx.array:
        t = mx.full((x_in.shape[0],), timestep, dtype=mx.float32)
        extras = self.extras
        if self.call_extras is not None:
            ids = self.side_ids or tuple(range(len(self.sides)))
            extras = extras.merged(self.call_extras(tuple(ids[s] for s in sides)))
        areas = [c.area for c in conds]
        for source in conds[0].sources:
            at = getattr(source, "unet_extras_at", None)  # a source that depends on the sigma (ControlNet)
            extras = extras.merged(at(x_in, t, context, areas, sigma=sigma, model_sampling=self.ms) if at
                                   else source.unet_extras(x_in, t, context, areas))
        if extras.is_empty:
            return self.unet_fn(x_in, t, context)
        return self.unet_fn(x_in, t, context, extras)

    def __call__(self, x: mx.array, sigma: float, skip: Sequence[bool] = ()) -> list[mx.array | None]:
        """Denoised predictions per side; a side whose `skip` is true is not evaluated (None)."""
        batch = x.shape[0]
        active = tuple((s, i) for s, side in enumerate(self.sides) if not (s < len(skip) and skip[s])
                       for i, c in enumerate(side) if c.active(sigma))
        sigma_b = mx.full((batch,), sigma, dtype=mx.float32)
        timestep = float(self.ms.timestep(np.float32(sigma)))
        outputs: dict[tuple[int, int], mx.array] = {}
        for members, context in self._plan(active):
            conds = [self.sides[s][i] for s, i in members]
            crops = [c.crop(x) for c in conds]
            x_in = self.ms.calculate_input(mx.concatenate([sigma_b] * len(conds)), mx.concatenate(crops))
            eps = self._call(x_in, timestep, context, conds, tuple(s for s, _ in members), sigma)
            for k, (member, crop) in enumerate(zip(members, crops, strict=True)):
                outputs[member] = self.ms.calculate_denoised(sigma_b, eps[k * batch : (k + 1) * batch], crop)
        return [None if (s < len(skip) and skip[s]) else
                _combine(x, [(side[i], outputs[(s, i)]) for (ss, i) in active if ss == s])
                for s, side in enumerate(self.sides)]


def _combine(x: mx.array, parts: list[tuple[Cond, mx.array]]) -> mx.array:
    """Weighted sum of the entries' predictions over their areas, divided by the summed weights."""
    if not parts:
        return mx.zeros(x.shape, dtype=x.dtype)  # ComfyUI: 0 / 1e-37
    if all(c.mult is None and c.area is None for c, _ in parts):
        return sum(p for _, p in parts) / len(parts)  # full-area entries of strength 1: their mean, exactly
    total = mx.zeros(x.shape, dtype=mx.float32)
    count = mx.full((1, *x.shape[1:3], 1), _EPSILON_COUNT, dtype=mx.float32)
    for cond, pred in parts:
        mult = cond.mult if cond.mult is not None else mx.ones((1, 1, 1, 1), dtype=mx.float32)
        if cond.area is None:
            total, count = total + pred * mult, count + mult
            continue
        h, w, y, x0 = cond.area
        pad = [(0, 0), (y, x.shape[1] - y - h), (x0, x.shape[2] - x0 - w), (0, 0)]
        mult = mx.broadcast_to(mult, (mult.shape[0], h, w, 1))
        total = total + mx.pad(pred * mult, pad)
        count = count + mx.pad(mult, pad)
    return total / count


__all__ = ["Cond", "CondBatcher", "as_entries", "resolve", "percent_to_sigma", "padded_context"]
