"""ComfyUI's CFG++ samplers (comfy/k_diffusion/sampling.py, eps models: alpha = 1, lambda = -log sigma).

CFG++ (Chung et al. 2024, arXiv 2406.08070) steps from the guided prediction back along the *unconditional*
noise direction: each step reads both `denoised` (after CFG) and `uncond_denoised`, which ComfyUI's samplers
capture with a post-CFG function and `disable_cfg1_optimization` (so the negative is evaluated at cfg 1 too).
Here that is `with_uncond` (sd/sampling/guidance.py). The sampler contract is in sd/sampling/common.py.
"""

from __future__ import annotations

import math

import mlx.core as mx

from sd.sampling.common import (
    CancelCheck,
    Denoiser,
    Sigmas,
    StepCallback,
    ancestral_noise,
    get_ancestral_step,
    sigma_list,
    sigma_of,
    step_indices,
    t_of,
    to_d,
)
from sd.sampling.guidance import with_uncond
from sd.sampling.multistep import _res_multistep
from sd.sampling.noise import NoiseSampler


def sample_euler_ancestral_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> mx.array:
    """Euler ancestral (CFG++): from the guided x0 along the unconditional noise down to sigma_down, then
    fresh noise up to the next sigma (the DDIM form of the step)."""
    sigmas = sigma_list(sigmas)
    both = with_uncond(denoise)
    inject = eta > 0 and s_noise > 0
    noise_sampler = ancestral_noise(x, noise_sampler, seed) if inject else None
    for i in step_indices(sigmas, cancel):
        denoised, uncond = both(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        d = to_d(x, sigmas[i], uncond)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + d * sigma_down
        if inject:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
    return x


def sample_euler_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """Euler (CFG++): euler_ancestral_cfg_pp without noise (ComfyUI ignores a given noise sampler here)."""
    return sample_euler_ancestral_cfg_pp(denoise, x, sigmas, callback=callback, cancel=cancel, seed=seed,
                                         eta=0.0, s_noise=0.0)


def sample_dpmpp_2s_ancestral_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> mx.array:
    """DPM-Solver++(2S) ancestral (CFG++): both stages on the unconditional prediction, the step's guidance
    (denoised - uncond) added back at the end."""
    sigmas = sigma_list(sigmas)
    both = with_uncond(denoise)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        denoised, uncond = both(x, sigmas[i])
        guidance = denoised - uncond
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], uncond) * (sigma_down - sigmas[i])
        else:
            t, t_next = t_of(sigmas[i]), t_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = x * (sigma_of(s) / sigma_of(t)) - uncond * math.expm1(-0.5 * h)
            _, uncond_2 = both(x_2, sigma_of(s))  # ComfyUI uses only this call's uncond
            x = x * (sigma_of(t_next) / sigma_of(t)) - uncond_2 * math.expm1(-h)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
        x = x + guidance
    return x


def sample_dpmpp_2m_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """DPM-Solver++(2M) (CFG++): the multistep correction from (denoised - the previous uncond), as
    ComfyUI computes it."""
    sigmas = sigma_list(sigmas)
    both = with_uncond(denoise)
    old_uncond = None
    for i in step_indices(sigmas, cancel):
        denoised, uncond = both(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised  # exp(-h) = 0 at sigma 0
        else:
            t, t_next = t_of(sigmas[i]), t_of(sigmas[i + 1])
            h = t_next - t
            mix = uncond * -math.exp(-h)
            if old_uncond is not None:
                r = (t - t_of(sigmas[i - 1])) / h
                mix = mix - (denoised - old_uncond) * (math.expm1(-h) / (2 * r))
            x = denoised + mix + x * math.exp(-h)
        old_uncond = uncond
    return x


def sample_res_multistep_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    s_noise: float = 1.0,
) -> mx.array:
    """RES second-order multistep (CFG++): the exponential step on the unconditional predictions, from x
    moved by this step's guidance."""
    return _res_multistep(denoise, x, sigmas, callback, cancel, noise_sampler, seed, 0.0, s_noise,
                          cfg_pp=True)


def sample_res_multistep_ancestral_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> mx.array:
    """res_multistep_cfg_pp down to sigma_down, then fresh noise up to the next sigma."""
    return _res_multistep(denoise, x, sigmas, callback, cancel, noise_sampler, seed, eta, s_noise,
                          cfg_pp=True)


def sample_gradient_estimation_cfg_pp(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    ge_gamma: float = 2.0,
) -> mx.array:
    """Gradient estimation (CFG++): the guided x0 plus the unconditional direction to the next sigma, and
    the change of that direction since the last step."""
    sigmas = sigma_list(sigmas)
    both = with_uncond(denoise)
    old_d = None
    for i in step_indices(sigmas, cancel):
        denoised, uncond = both(x, sigmas[i])
        d = to_d(x, sigmas[i], uncond)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if old_d is not None:
                x = x + (d - old_d) * ((ge_gamma - 1) * (sigmas[i + 1] - sigmas[i]))
        old_d = d
    return x
