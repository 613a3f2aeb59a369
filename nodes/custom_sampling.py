"""ComfyUI's custom sampling (comfy_extras/nodes_custom_sampler.py): sampling spelled out in pieces.

NOISE (RandomNoise, DisableNoise) + GUIDER (CFGGuider, BasicGuider, DualCFGGuider, PerpNegGuider) +
SAMPLER (KSamplerSelect) + SIGMAS (BasicScheduler, KarrasScheduler, ...; SplitSigmas, FlipSigmas) ->
SamplerCustomAdvanced; SamplerCustom takes model, cfg and conditionings itself. The pieces that spell out a
KSampler run the very same code (sd.sampling.ksampler.run_sampler), so they give the same latents.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from graph import CONDITIONING, LATENT, MODEL, Boolean, Choice, Float, Int, node
from nodes import models
from nodes.finite import check_finite
from nodes.sampling import MAX_SEED, model_sampling_of, progress_callback, sampling_entries
from nodes.sampling_values import GUIDER, NOISE, SAMPLER, SIGMAS, GuiderRecipe, NoiseRecipe, SamplerRecipe
from nodes.values import Conditioning, Latent, ModelRecipe
from sd.sampling.ksampler import SAMPLERS, SCHEDULERS
from sd.sampling.schedulers import AYS_NOISE_LEVELS

SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675  # SD1.x's range, ComfyUI's defaults
_SIGMA = Float(0.0, 5000.0)


def _sigmas(values) -> mx.array:
    out = mx.array(np.asarray(values, dtype=np.float32).reshape(-1))
    mx.eval(out)
    return out


# --- samplers and noise ---

@node(category="sampling/custom_sampling/samplers", outputs=(SAMPLER,))
def KSamplerSelect(sampler_name: Choice(SAMPLERS) = "euler"):
    """A sampler by name, for SamplerCustom / SamplerCustomAdvanced."""
    return SamplerRecipe(sampler_name)


@node(category="sampling/custom_sampling/noise", outputs=(NOISE,))
def RandomNoise(noise_seed: Int(0, MAX_SEED) = 0):
    """The initial noise of a seed (the same as KSampler's for that seed)."""
    return NoiseRecipe(noise_seed)


@node(category="sampling/custom_sampling/noise", outputs=(NOISE,))
def DisableNoise():
    """No initial noise: continue from a latent that is already noisy."""
    return NoiseRecipe(0, random=False)


# --- schedules ---

@node(category="sampling/custom_sampling/schedulers", outputs=(SIGMAS,))
def BasicScheduler(model: MODEL, scheduler: Choice(SCHEDULERS) = "normal", steps: Int(1, 10000) = 20,
                   denoise: Float(0.0, 1.0) = 1.0):
    """The model's sigmas by a named schedule; denoise < 1 keeps the last steps of a longer one (img2img)."""
    from sd.sampling.schedulers import basic_scheduler_sigmas

    return _sigmas(basic_scheduler_sigmas(model_sampling_of(model), scheduler, steps, denoise))


@node(category="sampling/custom_sampling/schedulers", outputs=(SIGMAS,))
def KarrasScheduler(steps: Int(1, 10000) = 20, sigma_max: _SIGMA = SIGMA_MAX, sigma_min: _SIGMA = SIGMA_MIN,
                    rho: Float(0.0, 100.0) = 7.0):
    """Karras et al.'s schedule between sigma_max and sigma_min (uniform in sigma^(1/rho))."""
    from sd.sampling.schedulers import karras_sigmas

    return _sigmas(karras_sigmas(steps, sigma_min, sigma_max, rho))


@node(category="sampling/custom_sampling/schedulers", outputs=(SIGMAS,))
def ExponentialScheduler(steps: Int(1, 10000) = 20, sigma_max: _SIGMA = SIGMA_MAX,
                         sigma_min: _SIGMA = SIGMA_MIN):
    """Sigmas uniform in log-sigma between sigma_max and sigma_min."""
    from sd.sampling.schedulers import exponential_sigmas

    return _sigmas(exponential_sigmas(steps, sigma_min, sigma_max))


@node(category="sampling/custom_sampling/schedulers", outputs=(SIGMAS,))
def PolyexponentialScheduler(steps: Int(1, 10000) = 20, sigma_max: _SIGMA = SIGMA_MAX,
                             sigma_min: _SIGMA = SIGMA_MIN, rho: Float(0.0, 100.0) = 1.0):
    """Log-sigma falling along ramp^rho from sigma_max to sigma_min (rho 1 = exponential)."""
    from sd.sampling.schedulers import polyexponential_sigmas

    return _sigmas(polyexponential_sigmas(steps, sigma_min, sigma_max, rho))


@node(category="sampling/custom_sampling/schedulers", outputs=(SIGMAS,))
def SDTurboScheduler(model: MODEL, steps: Int(1, 10) = 1, denoise: Float(0.0, 1.0) = 1.0):
    """SD-Turbo's schedule of 1-10 steps at timesteps 999, 899, 799 and so on (denoise < 1 starts lower)."""
    from sd.sampling.schedulers import sd_turbo_sigmas

    return _sigmas(sd_turbo_sigmas(model_sampling_of(model), steps, denoise))


@node(category="sampling/custom_sampling/schedulers", outputs=(SIGMAS,))
def AlignYourStepsScheduler(model_type: Choice(tuple(AYS_NOISE_LEVELS)) = "SD1", steps: Int(1, 10000) = 10,
                            denoise: Float(0.0, 1.0) = 1.0):
    """NVIDIA's Align Your Steps noise levels (optimised for 10 steps, log-linearly resampled otherwise)."""
    from sd.sampling.schedulers import align_your_steps_sigmas

    return _sigmas(align_your_steps_sigmas(model_type, steps, denoise))


@node(category="sampling/custom_sampling/sigmas", outputs=(SIGMAS, SIGMAS),
      output_names=("high_sigmas", "low_sigmas"))
def SplitSigmas(sigmas: SIGMAS, step: Int(0, 10000) = 0):
    """Split a schedule at a step: high_sigmas up to it, low_sigmas from it (both hold that sigma), for two
    samplers one after the other."""
    values = np.array(sigmas)
    return _sigmas(values[: step + 1]), _sigmas(values[step:])


@node(category="sampling/custom_sampling/sigmas", outputs=(SIGMAS, SIGMAS),
      output_names=("high_sigmas", "low_sigmas"))
def SplitSigmasDenoise(sigmas: SIGMAS, denoise: Float(0.0, 1.0) = 1.0):
    """Split a schedule so that low_sigmas is its last round(steps * denoise) steps."""
    values = np.array(sigmas)
    total = round(max(len(values) - 1, 0) * denoise)
    return _sigmas(values[:-total]), _sigmas(values[-(total + 1):])  # [:-0] is empty, as in ComfyUI


@node(category="sampling/custom_sampling/sigmas", outputs=(SIGMAS,))
def FlipSigmas(sigmas: SIGMAS):
    """The schedule reversed (rising noise: for unsampling); a first sigma of 0 becomes 0.0001."""
    values = np.array(sigmas)[::-1].copy()
    if len(values) and values[0] == 0:
        values[0] = 0.0001
    return _sigmas(values)


# --- guiders ---

@node(category="sampling/custom_sampling/guiders", outputs=(GUIDER,))
def CFGGuider(model: MODEL, positive: CONDITIONING, negative: CONDITIONING, cfg: Float(0.0, 100.0) = 8.0):
    """Classifier-free guidance, as KSampler does it."""
    return GuiderRecipe("cfg", model, (positive, negative), (cfg,))


@node(category="sampling/custom_sampling/guiders", outputs=(GUIDER,))
def BasicGuider(model: MODEL, conditioning: CONDITIONING):
    """The conditioning's prediction alone (no negative, cfg 1): for guidance-distilled models."""
    return GuiderRecipe("basic", model, (conditioning,), (1.0,))


@node(category="sampling/custom_sampling/guiders", outputs=(GUIDER,))
def DualCFGGuider(model: MODEL, cond1: CONDITIONING, cond2: CONDITIONING, negative: CONDITIONING,
                  cfg_conds: Float(0.0, 100.0) = 8.0, cfg_cond2_negative: Float(0.0, 100.0) = 8.0):
    """Two guidance scales: cond2 against the negative (cfg_cond2_negative), then cond1 against cond2
    (cfg_conds). ComfyUI's newer `style` input ("nested") is not offered: this is its "regular"."""
    return GuiderRecipe("dual_cfg", model, (cond1, cond2, negative), (cfg_conds, cfg_cond2_negative))


@node(category="sampling/custom_sampling/guiders", outputs=(GUIDER,))
def PerpNegGuider(model: MODEL, positive: CONDITIONING, negative: CONDITIONING,
                  empty_conditioning: CONDITIONING, cfg: Float(0.0, 100.0) = 8.0,
                  neg_scale: Float(0.0, 100.0) = 1.0):
    """Perp-Neg: only the part of the negative perpendicular to (positive - empty prompt) pushes away, so a
    negative that overlaps the positive does not cancel it."""
    return GuiderRecipe("perp_neg", model, (positive, negative, empty_conditioning), (cfg, neg_scale))


def _denoiser(guider: GuiderRecipe, latent: Latent, ctx):
    """The guider's denoise(x, sigma) for `latent`, the model's schedule and the model."""
    from nodes.inpaint import with_inpaint_concat
    from nodes.model_patches import sampling_patches
    from sd.sampling.conds import as_entries, resolve
    from sd.sampling.guidance import CFGDenoiser, DualCFGDenoiser, PerpNegDenoiser

    model: ModelRecipe = guider.model
    unet = models.unet_for(model, ctx.log)
    fast, ms, patches = models.fast_unet(unet), model_sampling_of(model), sampling_patches(model, unet)
    latent_shape = latent.samples.shape
    batch = latent_shape[0]

    def sides(*conds: Conditioning):
        entries = with_inpaint_concat(unet, sampling_entries(ctx, *conds), latent)
        return resolve([as_entries(e, batch) for e in entries], latent_shape, ms)

    if guider.kind == "cfg":
        pos, neg = sides(*guider.conds)
        return CFGDenoiser(fast, pos, neg, guider.scales[0], ms, patches), ms, model
    if guider.kind == "basic":
        (pos,) = sides(*guider.conds)
        return CFGDenoiser(fast, pos, [], 1.0, ms, patches), ms, model
    if guider.kind == "dual_cfg":
        cond1, cond2, negative = sides(*guider.conds)  # ComfyUI's order: positive, middle, negative
        return DualCFGDenoiser(fast, cond1, cond2, negative, *guider.scales, ms, patches), ms, model
    if guider.kind == "perp_neg":
        positive, negative, empty = guider.conds
        pos, emp, neg = sides(positive, empty, negative)  # ComfyUI's order of its conds
        return PerpNegDenoiser(fast, pos, neg, emp, *guider.scales, ms, patches), ms, model
    raise ValueError(f"unknown guider kind {guider.kind!r}")


def _run(ctx, noise: NoiseRecipe, guider: GuiderRecipe, sampler: SamplerRecipe, sigmas: mx.array,
         latent: Latent) -> tuple[Latent, Latent]:
    from nodes.inpaint import denoise_mask_function
    from sd.sampling.ksampler import run_sampler
    from sd.sampling.samplers import get_sampler

    values = np.array(sigmas, dtype=np.float32)
    if len(values) == 0:
        return latent, latent
    denoiser, ms, model = _denoiser(guider, latent, ctx)
    out, denoised = run_sampler(denoiser, latent.samples, noise.generate(latent.samples.shape), values,
                                get_sampler(sampler.name, ms), seed=noise.seed, model_sampling=ms,
                                callback=progress_callback(ctx), cancel=ctx.is_cancelled,
                                denoise_mask=latent.noise_mask, mask_function=denoise_mask_function(model))
    check_finite(out, "the sampled latents", model, "unet")
    mask = latent.noise_mask
    result = Latent(out, latent.batch_index, mask)
    return result, (Latent(denoised, latent.batch_index, mask) if denoised is not None else result)


_OUTPUTS = dict(outputs=(LATENT, LATENT), output_names=("output", "denoised_output"))


@node(category="sampling/custom_sampling", **_OUTPUTS)
def SamplerCustomAdvanced(noise: NOISE, guider: GUIDER, sampler: SAMPLER, sigmas: SIGMAS,
                          latent_image: LATENT, ctx=None):
    """Sample from pieces: noise, guider, sampler and sigmas. `denoised_output` is the last step's prediction
    of the clean latent."""
    return _run(ctx, noise, guider, sampler, sigmas, latent_image)


@node(category="sampling/custom_sampling", **_OUTPUTS)
def SamplerCustom(model: MODEL, add_noise: Boolean() = True, noise_seed: Int(0, MAX_SEED) = 0,
                  cfg: Float(0.0, 100.0) = 8.0, *, positive: CONDITIONING, negative: CONDITIONING,
                  sampler: SAMPLER, sigmas: SIGMAS, latent_image: LATENT, ctx=None):
    """SamplerCustomAdvanced with a CFG guider and the seed's noise built in (add_noise false: no noise, the
    seed still drives the sampler's own noise)."""
    noise = NoiseRecipe(noise_seed, random=add_noise)
    guider = GuiderRecipe("cfg", model, (positive, negative), (cfg,))
    return _run(ctx, noise, guider, sampler, sigmas, latent_image)
