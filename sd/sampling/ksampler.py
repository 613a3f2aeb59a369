"""ComfyUI's KSampler / KSamplerAdvanced: sigmas, initial noise, CFG and the sampler loop.

Latents come in and go out *unscaled* (VAE space, NHWC); the 0.18215 scale is applied here,
exactly where ComfyUI's ``process_latent_in`` / ``process_latent_out`` apply it (the noise is
not scaled). The initial noise is ComfyUI's ``prepare_noise``: one ``torch.randn`` of the
whole NCHW batch from ``seed`` on the CPU generator (sd/sampling/noise.py), so a batch of B images uses
the same numbers as ComfyUI's batch of B.

CFG works on the denoised prediction: ``uncond + (cond - uncond) * cfg``. Positive and
negative entries are evaluated in one UNet call (batch 2B) when their token lengths can be
padded to a common length (ComfyUI's ``CONDCrossAttn``: repeat each to the LCM of the lengths,
allowed while LCM / shortest <= 4; repeating keys and values leaves attention unchanged);
otherwise they get separate calls. With cfg == 1 the negative is not evaluated at all.
Several entries on one side (a list of conditionings) are averaged, as ComfyUI averages
full-area conds of strength 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from sd.sampling.model_sampling import LATENT_SCALE_FACTOR, SD1_MODEL_SAMPLING, ModelSamplingDiscrete
from sd.sampling.noise import torch_randn
from sd.sampling.rng import NoiseSource, resolve_rng
from sd.sampling.samplers import SAMPLERS, get_sampler
from sd.sampling.schedulers import SCHEDULERS, ksampler_sigmas

__all__ = ["SAMPLERS", "SCHEDULERS", "sample", "prepare_noise", "select_sigmas"]

UNetFn = Callable[[mx.array, mx.array, mx.array], mx.array]
ProgressCallback = Callable[[int, int, mx.array, mx.array], None]

_MAX_TOKEN_PADDING = 4  # ComfyUI's limit on LCM / shortest length when batching conds


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


def _as_entries(conditioning: mx.array | Sequence[mx.array], batch: int) -> list[mx.array]:
    entries = [conditioning] if isinstance(conditioning, mx.array) else list(conditioning)
    out = []
    for entry in entries:
        entry = mx.array(entry) if not isinstance(entry, mx.array) else entry
        if entry.shape[0] not in (1, batch):
            raise ValueError(f"conditioning batch {entry.shape[0]} does not match the latent batch {batch}")
        out.append(mx.repeat(entry, batch, axis=0) if entry.shape[0] != batch else entry)
    return out


def _can_batch(a: mx.array, b: mx.array) -> bool:
    la, lb = a.shape[1], b.shape[1]
    return la == lb or math.lcm(la, lb) // min(la, lb) <= _MAX_TOKEN_PADDING


def _group_for_calls(entries: list[mx.array]) -> list[list[int]]:
    """Indices of entries that share one UNet call (each compatible with the group's first)."""
    groups: list[list[int]] = []
    for index, entry in enumerate(entries):
        for group in groups:
            if all(_can_batch(entries[g], entry) for g in group):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def _padded_context(contexts: list[mx.array]) -> mx.array:
    length = math.lcm(*(c.shape[1] for c in contexts))
    return mx.concatenate([mx.tile(c, (1, length // c.shape[1], 1)) for c in contexts], axis=0)


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
    positive: list[mx.array],
    negative: list[mx.array],
    cfg: float,
    ms: ModelSamplingDiscrete,
) -> Callable[[mx.array, float], mx.array]:
    """denoise(x, sigma) for the samplers: batched UNet calls, eps -> x0, then CFG."""
    skip_uncond = math.isclose(cfg, 1.0)
    entries = positive + ([] if skip_uncond else negative)
    groups = _group_for_calls(entries)
    contexts = [_padded_context([entries[g] for g in group]) for group in groups]  # fixed for all steps

    def denoise(x: mx.array, sigma: float) -> mx.array:
        batch = x.shape[0]
        sigma_b = mx.full((batch,), sigma, dtype=mx.float32)
        x_in = ms.calculate_input(sigma_b, x)
        timestep = float(ms.timestep(np.float32(sigma)))
        denoised: list[mx.array | None] = [None] * len(entries)
        for group, context in zip(groups, contexts, strict=True):
            n = len(group)
            eps = unet_fn(
                mx.concatenate([x_in] * n, axis=0),
                mx.full((batch * n,), timestep, dtype=mx.float32),
                context,
            )
            for k, g in enumerate(group):
                denoised[g] = ms.calculate_denoised(sigma_b, eps[k * batch : (k + 1) * batch], x)
        cond = sum(denoised[: len(positive)]) / len(positive)
        if skip_uncond:
            return cond
        uncond = sum(denoised[len(positive) :]) / len(negative)
        return uncond + (cond - uncond) * cfg

    return denoise


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
    see sd/sampling/rng.py). Returns the unscaled latent.
    """
    sampler = get_sampler(sampler_name, model_sampling)
    latent = latent if isinstance(latent, mx.array) else mx.array(latent)
    sigmas = select_sigmas(
        model_sampling, scheduler, sampler_name, steps, denoise, start_step, last_step, force_full_denoise
    )
    if sigmas is None:
        return latent

    batch = latent.shape[0]
    pos, neg = _as_entries(positive, batch), _as_entries(negative, batch)
    source = NoiseSource(resolve_rng(rng), seed, latent.shape, eta_noise_seed_delta)
    noise = source.initial() if add_noise else mx.zeros(latent.shape, dtype=mx.float32)
    first_sigma = float(sigmas[0])
    x = model_sampling.noise_scaling(
        first_sigma,
        noise,
        latent * LATENT_SCALE_FACTOR,
        max_denoise=model_sampling.is_max_denoise(first_sigma),
    )
    total = len(sigmas) - 1

    def on_step(i: int, x_step: mx.array, denoised: mx.array) -> None:
        callback(i, total, x_step / LATENT_SCALE_FACTOR, denoised / LATENT_SCALE_FACTOR)

    denoiser = make_cfg_denoiser(unet_fn, pos, neg, cfg, model_sampling)
    steps_hook = StepPipeline(on_step if callback is not None else None)
    noise_sampler = source.sampler(sampler_name, sigmas)  # None: the sampler's own (ComfyUI on the CPU)
    x = sampler(denoiser, x, sigmas, callback=steps_hook, cancel=cancel, seed=seed,
                noise_sampler=noise_sampler)
    x = model_sampling.inverse_noise_scaling(float(sigmas[-1]), x)
    out = x / LATENT_SCALE_FACTOR
    mx.eval(out)
    return out
