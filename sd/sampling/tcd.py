"""TCD: Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024).

As the ``sample_tcd`` of ComfyUI-derived k-diffusion (and diffusers' ``TCDScheduler``): from each step's
x0 prediction it goes to an earlier point s = floor((1 - eta) * t_next) of the trajectory, in the
DDPM (variance-preserving) space of alpha_bar(s), then forward to sigma_next with fresh noise; eta = 0 is
deterministic (consistency sampling), eta = 1 is LCM-like. The default eta is 0.3, as there.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from sd.sampling.common import (
    CancelCheck,
    Denoiser,
    Sigmas,
    StepCallback,
    ancestral_noise,
    sigma_list,
    step_indices,
)
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING, ModelSamplingDiscrete
from sd.sampling.noise import NoiseSampler

TCD_ETA = 0.3


def tcd_alpha_prods(model_sampling: ModelSamplingDiscrete, sigmas: list[float], eta: float) -> list[float]:
    """alpha_bar at each step's target timestep floor((1 - eta) * t); the last one is timestep 0."""
    timesteps = [int(model_sampling.timestep(np.float32(s))) if s > 0 else 0 for s in sigmas]
    picked = [math.floor((1.0 - eta) * t) for t in timesteps]
    picked[-1] = 0
    return [float(model_sampling.alphas_cumprod[t]) for t in picked]


def sample_tcd(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    eta: float = TCD_ETA,
    model_sampling: ModelSamplingDiscrete = SD1_MODEL_SAMPLING,
) -> mx.array:
    """TCD sampling: predict x0, step back along the trajectory to s, re-noise to the next sigma."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    alpha_s = tcd_alpha_prods(model_sampling, sigmas, eta)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        eps = (x - denoised) / sigmas[i]
        a = alpha_s[i + 1]
        denoised = math.sqrt(a) * denoised + math.sqrt(1.0 - a) * eps  # x at timestep s, DDPM-scaled
        if callback is not None:
            callback(i, x, denoised)
        if eta > 0 and sigmas[i + 1] > 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = denoised / math.sqrt(a) + noise * math.sqrt(sigmas[i + 1] ** 2 + 1.0 - 1.0 / a)
        else:
            x = denoised * math.sqrt(1.0 + sigmas[i + 1] ** 2)
    return x
