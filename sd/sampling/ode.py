"""Deterministic samplers (probability-flow ODE solvers) with ComfyUI's names.

The sampler contract is in sd/sampling/common.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from sd.sampling.common import (
    CancelCheck,
    Denoiser,
    Sigmas,
    StepCallback,
    sigma_list,
    sigma_of,
    step_indices,
    t_of,
    to_d,
)
from sd.sampling.noise import NoiseSampler


def sample_euler(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    sigmas = sigma_list(sigmas)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the last step to 0."""
    sigmas = sigma_list(sigmas)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            x = x + (d + d_2) * (0.5 * dt)
    return x


def log_midpoint(a: float, b: float) -> float:
    return math.exp(0.5 * (math.log(a) + math.log(b)))


def sample_dpm_2(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """DPM-Solver-2 (Karras et al.'s midpoint variant): derivative taken at the log-midpoint."""
    sigmas = sigma_list(sigmas)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = log_midpoint(sigmas[i], sigmas[i + 1])
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


# Gauss-Legendre nodes/weights on [-1, 1]; 8 points integrate polynomials up to degree 15 exactly,
# far above the degree (order - 1 <= 3) of the Lagrange basis polynomials that LMS integrates.
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(8)


def linear_multistep_coeff(order: int, t: Sequence[float], i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial for node t_{i-j}."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    lo, hi = t[i], t[i + 1]
    taus = 0.5 * (hi - lo) * _GAUSS_NODES + 0.5 * (hi + lo)
    basis = np.ones_like(taus)
    for k in range(order):
        if k != j:
            basis *= (taus - t[i - k]) / (t[i - j] - t[i - k])
    return float(0.5 * (hi - lo) * np.dot(_GAUSS_WEIGHTS, basis))


def sample_lms(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    order: int = 4,
) -> mx.array:
    """Linear multistep: the ODE derivative extrapolated by a Lagrange polynomial in sigma."""
    sigmas = sigma_list(sigmas)
    ds: list[mx.array] = []
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            current_order = min(i + 1, order)
            for j, d in zip(range(current_order), reversed(ds), strict=True):
                x = x + d * linear_multistep_coeff(current_order, sigmas, i, j)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """DPM-Solver++(2M): second-order multistep using the previous step's denoised."""
    sigmas = sigma_list(sigmas)
    old_denoised = None
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised  # the exponential step's limit at sigma = 0
        else:
            t, t_next = t_of(sigmas[i]), t_of(sigmas[i + 1])
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t - t_of(sigmas[i - 1])) / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (sigma_of(t_next) / sigma_of(t)) - denoised_d * math.expm1(-h)
        old_denoised = denoised
    return x
