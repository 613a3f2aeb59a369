"""Ancestral and SDE samplers (fresh noise every step) with ComfyUI's names.

The sampler contract is in sd/sampling/common.py.

Where their per-step noise comes from, and how it compares with ComfyUI's, is told in sd/sampling/noise.py.
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
    brownian_noise,
    get_ancestral_step,
    sigma_list,
    sigma_of,
    step_indices,
    t_of,
    to_d,
)
from sd.sampling.noise import NoiseSampler
from sd.sampling.ode import log_midpoint


def sample_euler_ancestral(
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
    """Euler step down to sigma_down, then fresh noise up to sigma_{i+1}."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = (
                x
                + d * (sigma_down - sigmas[i])
                + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
            )
    return x


def sample_dpm_2_ancestral(
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
    """DPM-Solver-2 down to sigma_down, then fresh noise."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = log_midpoint(sigmas[i], sigma_down)
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
    return x


def sample_dpmpp_2s_ancestral(
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
    """DPM-Solver++(2S) single-step down to sigma_down, then fresh noise."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = t_of(sigmas[i]), t_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = x * (sigma_of(s) / sigma_of(t)) - denoised * math.expm1(-0.5 * h)
            denoised_2 = denoise(x_2, sigma_of(s))
            x = x * (sigma_of(t_next) / sigma_of(t)) - denoised_2 * math.expm1(-h)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
    return x


def float32_midpoint_sigma(sigma: float, sigma_next: float, r: float) -> float:
    """dpmpp_sde's intermediate sigma, rounded step by step as ComfyUI's float32 tensors round it.

    It is also a Brownian tree query point, and the tree rounds times to 1e-6, about one float32 ulp of
    sigma ~ 10: a query computed in float64 would sometimes land on the neighbouring grid point.
    """
    lam_s, lam_t = np.float32(-math.log(sigma)), np.float32(-math.log(sigma_next))
    lam_mid = np.float32(lam_s + np.float32(np.float32(r) * np.float32(lam_t - lam_s)))
    return float(np.float32(math.exp(-float(lam_mid))))


def sample_dpmpp_sde(
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
    r: float = 0.5,
) -> mx.array:
    """DPM-Solver++ SDE, two stages per step with Brownian noise (intermediate point at ratio r)."""
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    noise_sampler = brownian_noise(x, sigmas, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t = t_of(sigmas[i])
        sigma_s = float32_midpoint_sigma(sigmas[i], sigmas[i + 1], r)
        fac = 1 / (2 * r)
        sd, su = get_ancestral_step(sigmas[i], sigma_s, eta)
        s_ = t_of(sd)
        x_2 = x * (sigma_of(s_) / sigmas[i]) - denoised * math.expm1(t - s_)
        x_2 = x_2 + noise_sampler(sigmas[i], sigma_s) * (s_noise * su)
        denoised_2 = denoise(x_2, sigma_s)
        sd, su = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        t_next_ = t_of(sd)
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (sigma_of(t_next_) / sigmas[i]) - denoised_d * math.expm1(t - t_next_)
        x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * su)
    return x


def sample_dpmpp_2m_sde(
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
    solver_type: str = "midpoint",
) -> mx.array:
    """DPM-Solver++(2M) SDE with Brownian noise; ``solver_type`` 'midpoint' (default) or 'heun'."""
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    noise_sampler = brownian_noise(x, sigmas, noise_sampler, seed)
    old_denoised, h_last = None, None
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = t_of(sigmas[i + 1]) - t_of(sigmas[i])
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)
            x = x * (sigmas[i + 1] / sigmas[i] * math.exp(-eta_h)) + denoised * decay
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (denoised - old_denoised) * ((decay / (-h - eta_h) + 1) / r)
                else:
                    x = x + (denoised - old_denoised) * (0.5 * decay / r)
            if eta:
                noise_scale = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * noise_scale
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_3m_sde(
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
    """DPM-Solver++(3M) SDE with Brownian noise."""
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    noise_sampler = brownian_noise(x, sigmas, noise_sampler, seed)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = t_of(sigmas[i + 1]) - t_of(sigmas[i])
            h_eta = h * (eta + 1)
            x = x * math.exp(-h_eta) + denoised * (-math.expm1(-h_eta))
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * phi_2 - d2 * phi_3
            elif h_1 is not None:
                x = x + (denoised - denoised_1) * (phi_2 * h / h_1)
            if eta:
                noise_scale = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * noise_scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def sample_lcm(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """Latent consistency sampling: jump to the prediction, re-noise to the next sigma."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]  # EPS noise_scaling
    return x
