"""KSampler and KSamplerAdvanced: ComfyUI's sampling nodes over sd.sampling.ksampler.sample."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from graph import CONDITIONING, LATENT, MODEL, Choice, Float, Int, node
from nodes import models
from nodes.finite import check_finite
from nodes.values import Conditioning, Latent, ModelRecipe
from sd.sampling.ksampler import SAMPLERS, SCHEDULERS
from sd.sampling.rng import RNG_ENV, RNG_MODES, resolve_rng

MAX_SEED = 2**64 - 1
ON_OFF = ("enable", "disable")
# Whose noise to reproduce (sd/sampling/rng.py). The default is read once, here, so that it is part of
# the cache key like any written value; a bad $SDGRAPH_RNG is reported when a sampler runs.
DEFAULT_RNG = os.environ.get(RNG_ENV, "").strip().lower() or "cpu"
DEFAULT_RNG = DEFAULT_RNG if DEFAULT_RNG in RNG_MODES else "cpu"

# Names real workflow files carry for samplers sdgraph has under another name: ComfyUI's first releases
# (early 2023) named samplers by k-diffusion's functions (sample_euler, sample_dpmpp_2m, ...). (The *_gpu SDE
# samplers are samplers of their own: their Brownian tree draws from the CUDA generator in noise_device cuda.)
SAMPLER_ALIASES = {
    f"sample_{name}": name
    for name in SAMPLERS
    if name not in ("ddim", "uni_pc", "uni_pc_bh2") and not name.endswith("_gpu")
}


class SamplerChoice(Choice):
    """One of SAMPLERS; an alias (SAMPLER_ALIASES) is accepted and becomes its sampler's name, so it also
    shares that sampler's cache entries. `sdgraph nodes KSampler` lists the samplers only."""

    def __init__(self) -> None:
        super().__init__(SAMPLERS)

    def check(self, value):
        return super().check(SAMPLER_ALIASES.get(value, value) if isinstance(value, str) else value)

    def json_schema(self) -> dict:
        return {"enum": list(self.options) + list(SAMPLER_ALIASES)}


def model_sampling_of(model: ModelRecipe):
    """The noise schedule and prediction rules the model samples with (detected from the checkpoint or set by
    ModelSamplingDiscrete): the one place KSampler and custom sampling ask."""
    from sd.sampling.model_sampling import model_sampling_for

    return model_sampling_for(model.sampling.prediction, model.sampling.zsnr)


# Conditioning options that are recipes (a ControlNet, say) become what sd.sampling evaluates (an object with
# `unet_extras`, sd/sampling/conds.py) through a resolver registered for their key: resolve(value, ctx).
ENTRY_RESOLVERS: dict[str, Callable[[Any, Any], Any]] = {}


def register_entry_resolver(key: str, resolve: Callable[[Any, Any], Any]) -> None:
    ENTRY_RESOLVERS[key] = resolve


def sampling_entries(ctx, *conditionings: Conditioning) -> list[list]:
    """Each conditioning's (cond, options) pairs for sd.sampling, registered option keys resolved once per
    equal value across all of them (entries share a UNet call only with the same sources, by identity)."""
    resolved: dict = {}

    def resolve(key: str, value: Any) -> Any:
        if key not in ENTRY_RESOLVERS:
            return value
        memo = (key, value) if _hashable(value) else (key, id(value))
        if memo not in resolved:
            resolved[memo] = ENTRY_RESOLVERS[key](value, ctx)
        return resolved[memo]

    return [[(e.cond, {k: resolve(k, v) for k, v in e.options.items()}) for e in c] for c in conditionings]


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def progress_callback(ctx):
    def on_step(i: int, total: int, x, denoised) -> None:
        ctx.progress(i + 1, total)  # also where a cancelled run stops, between two steps

    return on_step


def _sample(ctx, model: ModelRecipe, positive: Conditioning, negative: Conditioning, latent: Latent,
            **kwargs) -> Latent:
    from nodes.inpaint import denoise_mask_function, with_inpaint_concat
    from nodes.model_patches import sampling_patches
    from sd.sampling.ksampler import sample

    resolve_rng(None)  # a misspelt $SDGRAPH_RNG fails here rather than being quietly ignored
    unet = models.unet_for(model, ctx.log)
    pos, neg = with_inpaint_concat(unet, sampling_entries(ctx, positive, negative), latent)
    samples = sample(models.fast_unet(unet), pos, neg, latent.samples, callback=progress_callback(ctx),
                     model_sampling=model_sampling_of(model), patches=sampling_patches(model, unet),
                     denoise_mask=latent.noise_mask, mask_function=denoise_mask_function(model), **kwargs)
    check_finite(samples, "the sampled latents", model, "unet")
    return Latent(samples, latent.batch_index, latent.noise_mask)


# Keyword-only parameters keep ComfyUI's input order (sockets among the widgets) while staying required.
@node(category="sampling", outputs=(LATENT,))
def KSampler(model: MODEL, *, seed: Int(0, MAX_SEED) = 0, steps: Int(1, 10000) = 20,
             cfg: Float(0.0, 100.0) = 8.0, sampler_name: SamplerChoice() = "euler",
             scheduler: Choice(SCHEDULERS) = "normal", positive: CONDITIONING,
             negative: CONDITIONING, latent_image: LATENT,
             denoise: Float(0.0, 1.0) = 1.0, noise_device: Choice(RNG_MODES) = DEFAULT_RNG,
             eta_noise_seed_delta: Int(0, MAX_SEED) = 0, ctx=None):
    """Denoise latents with a sampler and scheduler, as ComfyUI's KSampler (same seed, same noise).
    denoise < 1 keeps part of the input latent (img2img). sampler_name also accepts k-diffusion's sample_*
    names, as the sampler they name.

    noise_device (sdgraph's; default $SDGRAPH_RNG, else cpu) picks whose noise the seed gives: "cpu" as
    ComfyUI on the CPU, "cuda" as ComfyUI on an NVIDIA GPU (its per-step noise comes from torch's CUDA
    generator; the *_gpu SDE samplers' Brownian tree too), "a1111" as AUTOMATIC1111's GPU seeds (with
    eta_noise_seed_delta, A1111's ENSD)."""
    return _sample(ctx, model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
                   sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, rng=noise_device,
                   eta_noise_seed_delta=eta_noise_seed_delta)


@node(category="sampling", outputs=(LATENT,))
def KSamplerAdvanced(model: MODEL, *, add_noise: Choice(ON_OFF) = "enable", noise_seed: Int(0, MAX_SEED) = 0,
                     steps: Int(1, 10000) = 20, cfg: Float(0.0, 100.0) = 8.0,
                     sampler_name: SamplerChoice() = "euler", scheduler: Choice(SCHEDULERS) = "normal",
                     positive: CONDITIONING, negative: CONDITIONING,
                     latent_image: LATENT, start_at_step: Int(0, 10000) = 0,
                     end_at_step: Int(0, 10000) = 10000,
                     return_with_leftover_noise: Choice(ON_OFF) = "disable",
                     noise_device: Choice(RNG_MODES) = DEFAULT_RNG,
                     eta_noise_seed_delta: Int(0, MAX_SEED) = 0, ctx=None):
    """KSampler over a range of steps (ComfyUI's KSamplerAdvanced).

    Runs steps start_at_step up to end_at_step of a `steps`-step schedule; add_noise "disable"
    continues from a latent that still holds noise, return_with_leftover_noise "enable" stops
    without denoising fully (for a second sampler to finish). noise_device and eta_noise_seed_delta: as
    KSampler's."""
    return _sample(ctx, model, positive, negative, latent_image, seed=noise_seed, steps=steps, cfg=cfg,
                   sampler_name=sampler_name, scheduler=scheduler, start_step=start_at_step,
                   last_step=end_at_step, add_noise=add_noise == "enable",
                   force_full_denoise=return_with_leftover_noise == "disable", rng=noise_device,
                   eta_noise_seed_delta=eta_noise_seed_delta)

