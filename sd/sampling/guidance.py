"""The CFG denoiser and the patches that change it: ComfyUI's `sampling_function` / `cfg_function` with
`model_options`' `sampler_cfg_function`, `sampler_post_cfg_function` and per-call UNet patches.

`make_denoiser(unet_fn, positive, negative, cfg, ms, patches)` returns `denoise(x, sigma) -> x0` for the
samplers: both sides through `CondBatcher` (sd/sampling/conds.py), then

    denoised = patches.cfg_function(CfgArgs) or uncond + (cond - uncond) * cfg
    denoised = post(PostCfgArgs) for each post-CFG function in order

With cfg == 1 the negative is not evaluated (unless a patch needs it), as in ComfyUI. `DualCFGDenoiser`
and `PerpNegDenoiser` are ComfyUI's DualCFGGuider and PerpNegGuider over the same pieces.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from sd.models.unet_extras import NO_EXTRAS, UNetExtras
from sd.sampling.conds import Cond, CondBatcher


@dataclass(frozen=True)
class CfgArgs:
    """What a CFG function sees (ComfyUI passes cond/uncond as x - denoised; we pass the denoised)."""

    cond_denoised: mx.array
    uncond_denoised: mx.array
    cond_scale: float
    sigma: float
    x: mx.array


@dataclass(frozen=True)
class PostCfgArgs:
    """What a post-CFG function sees; `evaluate(which, x, extras)` denoises x with the "cond" or "uncond"
    entries and extra UNet patches: what PAG and SAG call the model again with."""

    denoised: mx.array
    cond_denoised: mx.array
    uncond_denoised: mx.array
    cond_scale: float
    sigma: float
    x: mx.array
    evaluate: Callable[[str, mx.array, UNetExtras], mx.array]


@dataclass(frozen=True)
class SamplingPatches:
    """A model's sampling patches (built from MODEL recipe patches by nodes/model_patches.py).

    cfg_function   replaces the CFG combination (RescaleCFG)
    post_cfg       run in order on the combined prediction (SAG, PAG)
    unet_extras    carried by every UNet call (FreeU's block patch)
    call_extras    fn(sides) -> UNetExtras for one UNet call whose batch chunks come from `sides` (0 = the
                   first side, positive; 1 = the second; ComfyUI's cond_or_uncond): SAG's recording hook
    needs_uncond   evaluate the negative even at cfg 1 (ComfyUI's disable_cfg1_optimization)
    """

    cfg_function: Callable[[CfgArgs], mx.array] | None = None
    post_cfg: tuple[Callable[[PostCfgArgs], mx.array], ...] = ()
    unet_extras: UNetExtras = NO_EXTRAS
    call_extras: Callable[[tuple[int, ...]], UNetExtras] | None = None
    needs_uncond: bool = False

    def then(self, other: SamplingPatches) -> SamplingPatches:
        """These patches, then `other`'s (a later CFG function replaces an earlier one, as in ComfyUI)."""
        calls = [f for f in (self.call_extras, other.call_extras) if f is not None]
        call_extras = None
        if len(calls) == 1:
            call_extras = calls[0]
        elif calls:
            def call_extras(sides, first=calls[0], second=calls[1]):
                return first(sides).merged(second(sides))
        return SamplingPatches(other.cfg_function or self.cfg_function, self.post_cfg + other.post_cfg,
                               self.unet_extras.merged(other.unet_extras), call_extras,
                               self.needs_uncond or other.needs_uncond)


NO_PATCHES = SamplingPatches()


def cfg_function(patches: SamplingPatches, cond: mx.array, uncond: mx.array, cfg: float, sigma: float,
                 x: mx.array, evaluate: Callable[[str, mx.array, UNetExtras], mx.array]) -> mx.array:
    """ComfyUI's cfg_function: the CFG combination (or the patch's), then the post-CFG functions."""
    if patches.cfg_function is not None:
        denoised = patches.cfg_function(CfgArgs(cond, uncond, cfg, sigma, x))
    else:
        denoised = uncond + (cond - uncond) * cfg
    return post_cfg(patches, denoised, cond, uncond, cfg, sigma, x, evaluate)


def post_cfg(patches: SamplingPatches, denoised: mx.array, cond: mx.array, uncond: mx.array, cfg: float,
             sigma: float, x: mx.array, evaluate) -> mx.array:
    for post in patches.post_cfg:
        denoised = post(PostCfgArgs(denoised, cond, uncond, cfg, sigma, x, evaluate))
    return denoised


class _Guided:
    """Shared by the denoisers: sides of entries batched per step, and re-evaluation for post-CFG patches."""

    def __init__(self, unet_fn, sides: list[list[Cond]], ms, patches: SamplingPatches,
                 roles: dict[str, int]):
        self.unet_fn, self.sides, self.ms, self.patches, self.roles = unet_fn, sides, ms, patches, roles
        self.batcher = CondBatcher(unet_fn, sides, ms, patches.unet_extras, patches.call_extras)

    def evaluator(self, sigma: float) -> Callable[[str, mx.array, UNetExtras], mx.array]:
        def evaluate(which: str, x: mx.array, extras: UNetExtras = NO_EXTRAS) -> mx.array:
            side = self.sides[self.roles[which]]
            batcher = CondBatcher(self.unet_fn, [side], self.ms, self.patches.unet_extras.merged(extras),
                                  self.patches.call_extras, side_ids=(self.roles[which],))
            return batcher(x, sigma)[0]

        return evaluate

    def with_patches(self, extra: SamplingPatches) -> _Guided:
        """This denoiser with `extra` patches after its own (what a sampler adds for itself, as ComfyUI's
        samplers add to `model_options`)."""
        other = copy.copy(self)
        other.patches = self.patches.then(extra)
        other.batcher = CondBatcher(self.unet_fn, self.sides, self.ms, other.patches.unet_extras,
                                    other.patches.call_extras)
        return other


class CFGDenoiser(_Guided):
    """denoise(x, sigma) with classifier-free guidance over resolved positive/negative entries (ComfyUI's
    CFGGuider; BasicGuider is this with cfg 1 and no negative)."""

    def __init__(self, unet_fn, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float, ms,
                 patches: SamplingPatches = NO_PATCHES):
        super().__init__(unet_fn, [list(positive), list(negative)], ms, patches, {"cond": 0, "uncond": 1})
        self.cfg = cfg

    def __call__(self, x: mx.array, sigma: float) -> mx.array:
        skip_uncond = math.isclose(self.cfg, 1.0) and not self.patches.needs_uncond
        cond, uncond = self.batcher(x, sigma, skip=(False, skip_uncond))
        if uncond is None:
            if self.patches.cfg_function is None and not self.patches.post_cfg:
                return cond
            uncond = mx.zeros(x.shape, dtype=x.dtype)  # what ComfyUI's skipped side sums to (0 / 1e-37)
        return cfg_function(self.patches, cond, uncond, self.cfg, sigma, x, self.evaluator(sigma))


class DualCFGDenoiser(_Guided):
    """ComfyUI's DualCFGGuider: cfg_function(cond2 over negative, cfg_cond2_negative) + (cond1 - cond2) *
    cfg_conds, the three sides evaluated together."""

    def __init__(self, unet_fn, cond1: Sequence[Cond], cond2: Sequence[Cond], negative: Sequence[Cond],
                 cfg_conds: float, cfg_cond2_negative: float, ms, patches: SamplingPatches = NO_PATCHES):
        # ComfyUI evaluates [negative, middle, positive]: those are the sides' indices in a call
        super().__init__(unet_fn, [list(negative), list(cond2), list(cond1)], ms, patches,
                         {"uncond": 0, "cond": 1, "positive": 2})
        self.cfg1, self.cfg2 = cfg_conds, cfg_cond2_negative

    def __call__(self, x: mx.array, sigma: float) -> mx.array:
        negative, middle, positive = self.batcher(x, sigma)
        guided = cfg_function(self.patches, middle, negative, self.cfg2, sigma, x, self.evaluator(sigma))
        return guided + (positive - middle) * self.cfg1


class PerpNegDenoiser(_Guided):
    """ComfyUI's PerpNegGuider: the negative's component perpendicular to (positive - empty) is what guides
    away (Armandpour et al. 2023); post-CFG patches run after."""

    def __init__(self, unet_fn, positive: Sequence[Cond], negative: Sequence[Cond], empty: Sequence[Cond],
                 cfg: float, neg_scale: float, ms, patches: SamplingPatches = NO_PATCHES):
        super().__init__(unet_fn, [list(positive), list(negative), list(empty)], ms, patches,
                         {"cond": 0, "uncond": 1, "empty": 2})
        self.cfg, self.neg_scale = cfg, neg_scale

    def __call__(self, x: mx.array, sigma: float) -> mx.array:
        pos_pred, neg_pred, empty_pred = self.batcher(x, sigma)
        denoised = perp_neg(pos_pred, neg_pred, empty_pred, self.neg_scale, self.cfg)
        return post_cfg(self.patches, denoised, pos_pred, neg_pred, self.cfg, sigma, x, self.evaluator(sigma))


def perp_neg(pos_pred: mx.array, neg_pred: mx.array, empty_pred: mx.array, neg_scale: float,
             cond_scale: float) -> mx.array:
    """ComfyUI's perp_neg: projections over the whole batch at once, as it computes them."""
    pos, neg = pos_pred - empty_pred, neg_pred - empty_pred
    perp = neg - ((neg * pos).sum() / (mx.linalg.norm(pos.reshape(-1)) ** 2)) * pos
    return empty_pred + cond_scale * (pos - perp * neg_scale)


class UncondCapture:
    """A post-CFG function that records the uncond prediction and changes nothing: how ComfyUI's cfg_pp
    samplers read `uncond_denoised` (with disable_cfg1_optimization, so the negative runs at cfg 1 too)."""

    def __init__(self):
        self.uncond: mx.array | None = None

    def __call__(self, args: PostCfgArgs) -> mx.array:
        self.uncond = args.uncond_denoised
        return args.denoised


def with_uncond(denoise: Callable[[mx.array, float], mx.array]
                ) -> Callable[[mx.array, float], tuple[mx.array, mx.array]]:
    """`both(x, sigma) -> (denoised, uncond_denoised)` for a CFG++ sampler. A guided denoiser gets an
    UncondCapture appended to its post-CFG functions; a plain `denoise(x, sigma)` has no separate
    unconditional prediction, so it stands for both (as CFG with the negative equal to the positive)."""
    if not hasattr(denoise, "with_patches"):
        def plain(x: mx.array, sigma: float) -> tuple[mx.array, mx.array]:
            denoised = denoise(x, sigma)
            return denoised, denoised

        return plain
    capture = UncondCapture()
    patched = denoise.with_patches(SamplingPatches(post_cfg=(capture,), needs_uncond=True))

    def both(x: mx.array, sigma: float) -> tuple[mx.array, mx.array]:
        denoised = patched(x, sigma)
        return denoised, capture.uncond

    return both


def make_denoiser(unet_fn, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float, ms,
                  patches: SamplingPatches = NO_PATCHES) -> CFGDenoiser:
    return CFGDenoiser(unet_fn, positive, negative, cfg, ms, patches)
