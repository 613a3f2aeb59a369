"""The CFG denoiser and the patches that change it: ComfyUI's `sampling_function` / `cfg_function` with
`model_options`' `sampler_cfg_function`, `sampler_post_cfg_function` and per-call UNet patches.

`make_denoiser(unet_fn, positive, negative, cfg, ms, patches)` returns `denoise(x, sigma) -> x0` for the
samplers: both sides through `CondBatcher` (sd/sampling/conds.py), then

    denoised = patches.cfg_function(CfgArgs) or uncond + (cond - uncond) * cfg
    denoised = post(PostCfgArgs) for each post-CFG function in order

With cfg == 1 the negative is not evaluated (unless a patch needs it), as in ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    """What a post-CFG function sees; `evaluate(side, x, extras)` denoises x with one side's entries (0 =
    positive, 1 = negative) and extra UNet patches: what PAG and SAG call the model again with."""

    denoised: mx.array
    cond_denoised: mx.array
    uncond_denoised: mx.array | None
    cond_scale: float
    sigma: float
    x: mx.array
    evaluate: Callable[[int, mx.array, UNetExtras], mx.array]


@dataclass(frozen=True)
class SamplingPatches:
    """A model's sampling patches (built from MODEL recipe patches by nodes/model_patches.py).

    cfg_function   replaces the CFG combination (RescaleCFG)
    post_cfg       run in order on the combined prediction (SAG, PAG)
    unet_extras    carried by every UNet call (FreeU's block patch)
    needs_uncond   evaluate the negative even at cfg 1 (ComfyUI's disable_cfg1_optimization)
    """

    cfg_function: Callable[[CfgArgs], mx.array] | None = None
    post_cfg: tuple[Callable[[PostCfgArgs], mx.array], ...] = ()
    unet_extras: UNetExtras = NO_EXTRAS
    needs_uncond: bool = False

    def then(self, other: SamplingPatches) -> SamplingPatches:
        """These patches, then `other`'s (a later CFG function replaces an earlier one, as in ComfyUI)."""
        return SamplingPatches(other.cfg_function or self.cfg_function, self.post_cfg + other.post_cfg,
                               self.unet_extras.merged(other.unet_extras),
                               self.needs_uncond or other.needs_uncond)


NO_PATCHES = SamplingPatches()


@dataclass
class CFGDenoiser:
    """denoise(x, sigma) for the samplers, over resolved positive/negative entries."""

    unet_fn: Callable[..., mx.array]
    positive: list[Cond]
    negative: list[Cond]
    cfg: float
    ms: object
    patches: SamplingPatches = NO_PATCHES
    _batcher: CondBatcher = field(init=False)

    def __post_init__(self) -> None:
        self._batcher = CondBatcher(self.unet_fn, [self.positive, self.negative], self.ms,
                                    self.patches.unet_extras)

    def evaluate(self, side: int, x: mx.array, sigma: float, extras: UNetExtras = NO_EXTRAS) -> mx.array:
        batcher = CondBatcher(self.unet_fn, [[self.positive, self.negative][side]], self.ms,
                              self.patches.unet_extras.merged(extras))
        return batcher(x, sigma)[0]

    def __call__(self, x: mx.array, sigma: float) -> mx.array:
        skip_uncond = math.isclose(self.cfg, 1.0) and not self.patches.needs_uncond
        cond, uncond = self._batcher(x, sigma, skip=(False, skip_uncond))
        if uncond is None and (self.patches.cfg_function is not None or self.patches.post_cfg):
            uncond = mx.zeros(x.shape, dtype=x.dtype)  # what ComfyUI's skipped side sums to (0 / 1e-37)
        if self.patches.cfg_function is not None:
            denoised = self.patches.cfg_function(CfgArgs(cond, uncond, self.cfg, sigma, x))
        elif uncond is None:
            denoised = cond
        else:
            denoised = uncond + (cond - uncond) * self.cfg
        for post in self.patches.post_cfg:
            denoised = post(PostCfgArgs(denoised, cond, uncond, self.cfg, sigma, x,
                                        lambda side, x_, extras, s=sigma: self.evaluate(side, x_, s, extras)))
        return denoised


def make_denoiser(unet_fn, positive: Sequence[Cond], negative: Sequence[Cond], cfg: float, ms,
                  patches: SamplingPatches = NO_PATCHES) -> CFGDenoiser:
    return CFGDenoiser(unet_fn, list(positive), list(negative), cfg, ms, patches)
