"""ComfyUI's KSampler / KSamplerAdvanced: sigmas, initial noise, CFG and the sampler loop.

Latents come in and go out *unscaled* (VAE space, NHWC); the 0.18215 scale is applied here,
exactly where ComfyUI's ``process_latent_in`` / ``process_latent_out`` apply it (the noise is
not scaled). The initial noise is ComfyUI's ``prepare_noise``: one ``torch.randn`` of the
whole NCHW batch from ``seed`` on the CPU generator (sd/sampling/noise.py), so a batch of B images uses
the same numbers as ComfyUI's batch of B.

CFG works on the denoised prediction: ``uncond + (cond - uncond) * cfg`` (sd/sampling/guidance.py).
Conditioning entries (areas, masks, strengths, timestep ranges) are evaluated as ComfyUI's
``calc_cond_batch`` does (sd/sampling/conds.py): positive and negative entries share one UNet call
when their crops have one shape and their token lengths pad to a common length (LCM / shortest <= 4);
with cfg == 1 the negative is not evaluated at all. ``run_sampler`` is the loop from given pieces
(noise, sigmas, sampler, denoiser) that KSampler and SamplerCustomAdvanced both run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from sd.sampling.conds import Cond, as_entries, resolve
from sd.sampling.guidance import NO_PATCHES, SamplingPatches, make_denoiser
from sd.sampling.inpaint import MaskedDenoiser, MaskFunction, prepare_mask
from sd.sampling.model_sampling import LATENT_SCALE_FACTOR, SD1_MODEL_SAMPLING, ModelSamplingDiscrete
from sd.sampling.noise import torch_randn
from sd.sampling.rng import NoiseSource, resolve_rng
from sd.sampling.samplers import SAMPLERS, get_sampler
from sd.sampling.schedulers import SCHEDULERS, ksampler_sigmas

__all__ = ["SAMPLERS", "SCHEDULERS", "sample", "run_sampler", "prepare_noise", "select_sigmas"]

UNetFn = Callable[[mx.array, mx.array, mx.array], mx.array]
ProgressCallback = Callable[[int, int, mx.array, mx.array], None]

def prepare_noise(seed: int, latent_shape_nhwc: Sequence[int]) -> mx.array:
    """ComfyUI's initial noise for a latent batch, drawn NCHW (as ComfyUI does) and returned NHWC."""
    b, h, w, c = latent_shape_nhwc
    noise = torch_randn(seed, (b, c, h, w))
    return mx.array(np.ascontiguousarray(noise.transpose(0, 2, 3, 1)))


def select_sigmas(
    ms: ModelSamplingDiscrete,
    scheduler: str,
    sampler_name: str,
    steps: int,
    denoise: float = 1.0,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = True,
) -> np.ndarray | None:
    """The sigmas ComfyUI's KSampler runs, or None when it returns the input latent unchanged."""
    sigmas = ksampler_sigmas(ms, scheduler, steps, denoise, sampler_name)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].copy()
        if force_full_denoise:
            sigmas[-1] = 0.0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas if len(sigmas) > 0 else None


class StepPipeline:
    """One run's step hook, given to the sampler as its callback (always, so that pipelining happens without
    a user callback too): it starts evaluating step i, then waits for step i-1, so the device computes step i
    while Python builds step i+1's graph (building a compiled UNet's graph and dispatching its ~900 kernels is
    host work the GPU would otherwise wait for), yet never more than one step is queued. Then it calls the
    user's `callback(i, x, denoised)` (which may read them: reading waits). The previous step's arrays live
    in this object, so they go when the run does."""

    def __init__(self, callback: Callable[[int, mx.array, mx.array], None] | None = None):
        self.callback = callback
        self.previous: tuple[mx.array, ...] = ()

    def __call__(self, i: int, x: mx.array, denoised: mx.array) -> None:
        mx.async_eval(x, denoised)
        if self.previous:
            mx.eval(*self.previous)
        self.previous = (x, denoised)
        if self.callback is not None:
            self.callback(i, x, denoised)


def make_cfg_denoiser(
    unet_fn: UNetFn,
    positive,
    negative,
    cfg: float,
    ms: ModelSamplingDiscrete,
    latent_shape: Sequence[int] | None = None,
    patches: SamplingPatches = NO_PATCHES,
) -> Callable[[mx.array, float], mx.array]:
    """denoise(x, sigma) for the samplers: the entries resolved (areas, masks, timestep ranges), batched
    UNet calls, eps -> x0, then CFG (sd/sampling/conds.py, sd/sampling/guidance.py). `positive`/`negative`:
    lists of `Cond`, or of arrays / (array, options) pairs resolved here for a latent of `latent_shape`."""
    if not all(isinstance(c, Cond) for c in [*positive, *negative]):
        batch = latent_shape[0]
        sides = [as_entries(positive, batch), as_entries(negative, batch)]
        positive, negative = resolve(sides, latent_shape, ms)
    return make_denoiser(unet_fn, positive, negative, cfg, ms, patches)


def sample(
    unet_fn: UNetFn,
    positive: mx.array | Sequence[mx.array],
    negative: mx.array | Sequence[mx.array],
    latent: mx.array,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    start_step: int | None = None,
    last_step: int | None = None,
    add_noise: bool = True,
    force_full_denoise: bool = True,
    callback: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    model_sampling: ModelSamplingDiscrete = SD1_MODEL_SAMPLING,
    rng: str | None = None,
    eta_noise_seed_delta: int = 0,
    patches: SamplingPatches = NO_PATCHES,
    denoise_mask: mx.array | None = None,
    mask_function: MaskFunction | None = None,
) -> mx.array:
    """Sample like ComfyUI's KSampler (and KSamplerAdvanced through the step arguments).

    ``latent`` is unscaled NHWC [B, h, w, 4]; ``positive`` / ``negative`` are conditioning arrays
    [1 or B, L, C] (or lists of them). KSamplerAdvanced maps onto: ``start_step=start_at_step``,
    ``last_step=end_at_step``, ``add_noise=(add_noise == "enable")``,
    ``force_full_denoise=(return_with_leftover_noise == "disable")``; the plain KSampler node is
    the defaults. ``callback(i, total, x, denoised)`` is called at each step i = 0..total-1
    with the current latent and its prediction (unscaled NHWC); ``cancel()`` is polled between
    steps and raises :class:`sd.errors.Cancelled`. ``rng`` picks whose noise to reproduce ("cpu": ComfyUI
    on the CPU, "cuda": ComfyUI on NVIDIA, "a1111": A1111's GPU seeds; None: ``$SDGRAPH_RNG``, else cpu;
    see sd/sampling/rng.py). ``denoise_mask`` (a MASK [B, H, W], 1 = change) keeps the rest of ``latent``
    (sd/sampling/inpaint.py). Returns the unscaled latent.
    """
    sampler = get_sampler(sampler_name, model_sampling)
    latent = latent if isinstance(latent, mx.array) else mx.array(latent)
    sigmas = select_sigmas(
        model_sampling, scheduler, sampler_name, steps, denoise, start_step, last_step, force_full_denoise
    )
    if sigmas is None:
        return latent

    batch = latent.shape[0]
    sides = [as_entries(positive, batch), as_entries(negative, batch)]
    pos, neg = resolve(sides, latent.shape, model_sampling)
    source = NoiseSource(resolve_rng(rng), seed, latent.shape, eta_noise_seed_delta)
    noise = source.initial() if add_noise else mx.zeros(latent.shape, dtype=mx.float32)
    noise_sampler = source.sampler(sampler_name, sigmas)  # None: the sampler's own (ComfyUI on the CPU)
    denoiser = make_denoiser(unet_fn, pos, neg, cfg, model_sampling, patches)
    out, _ = run_sampler(denoiser, latent, noise, sigmas, sampler, seed=seed, model_sampling=model_sampling,
                         callback=callback, cancel=cancel, denoise_mask=denoise_mask,
                         mask_function=mask_function,
                         sampler_options=None if noise_sampler is None else {"noise_sampler": noise_sampler})
    return out


def run_sampler(
    denoiser: Callable[[mx.array, float], mx.array],
    latent: mx.array,
    noise: mx.array,
    sigmas: np.ndarray,
    sampler: Callable[..., mx.array],
    *,
    seed: int,
    model_sampling: ModelSamplingDiscrete = SD1_MODEL_SAMPLING,
    callback: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    sampler_options: dict | None = None,
    denoise_mask: mx.array | None = None,
    mask_function: MaskFunction | None = None,
) -> tuple[mx.array, mx.array | None]:
    """The sampler loop from given pieces (ComfyUI's KSAMPLER.sample, what SamplerCustomAdvanced runs):
    noise scaled onto the (unscaled) latent at sigmas[0], the sampler over `sigmas` with `denoiser`, and
    back. With `denoise_mask` (a MASK, 1 = change) the denoiser is ComfyUI's KSamplerX0Inpaint around it,
    `mask_function` its per-step mask (DifferentialDiffusion). Returns the unscaled latent and the last
    step's unscaled x0 prediction (None without steps)."""
    first_sigma = float(sigmas[0])
    scaled = latent * LATENT_SCALE_FACTOR
    if denoise_mask is not None:
        denoiser = MaskedDenoiser(denoiser, scaled, noise, prepare_mask(denoise_mask, latent.shape), sigmas,
                                  model_sampling, mask_function)
    x = model_sampling.noise_scaling(
        first_sigma,
        noise,
        scaled,
        max_denoise=model_sampling.is_max_denoise(first_sigma),
    )
    total = len(sigmas) - 1
    last: list[mx.array] = []

    def on_step(i: int, x_step: mx.array, denoised: mx.array) -> None:
        last[:] = [denoised]
        if callback is not None:
            callback(i, total, x_step / LATENT_SCALE_FACTOR, denoised / LATENT_SCALE_FACTOR)

    steps_hook = StepPipeline(on_step)
    x = sampler(denoiser, x, sigmas, callback=steps_hook, cancel=cancel, seed=seed, **(sampler_options or {}))
    x = model_sampling.inverse_noise_scaling(float(sigmas[-1]), x)
    out = x / LATENT_SCALE_FACTOR
    denoised = last[0] / LATENT_SCALE_FACTOR if last else None
    mx.eval(out, *([denoised] if denoised is not None else []))
    return out, denoised
