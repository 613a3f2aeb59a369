"""UniPC (Zhao et al. 2023), multistep predictor-corrector, as ComfyUI's ``uni_pc`` / ``uni_pc_bh2``.

ComfyUI runs UniPC on the variance-preserving form of the latent: x_vp = x / sqrt(1 + sigma^2),
with alpha = 1 / sqrt(1 + sigma^2), std = sigma * alpha and lambda = log(alpha / std) = -log(sigma).
It predicts x0 (``predict_x0=True``), uses order min(3, len(sigmas) - 2) with lower orders for the
first and last steps, runs the corrector on every step but the last, and replaces a final sigma
of 0 by 0.001 (then divides by that sigma's alpha at the end). ``bh1`` and ``bh2`` differ only in
B(h). One model evaluation per step.

Deviation: for a single step (two sigmas) ComfyUI's order would be 0; we take one first-order step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from sd.sampling.common import CancelCheck, Denoiser, Sigmas, StepCallback, sigma_list, step_indices
from sd.sampling.noise import NoiseSampler

_FINAL_SIGMA = 0.001  # ComfyUI's stand-in for sigma = 0, where lambda would be infinite


def _alpha(sigma: float) -> float:
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _lambda(sigma: float) -> float:
    return -math.log(sigma)


def _coefficients(hh: float, order: int, variant: str) -> tuple[float, np.ndarray, float]:
    """phi-function terms: h*phi_1, the right-hand sides b_k and B(h) of the UniPC linear systems."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, np.array(b), b_h


def _update(
    x: mx.array,
    model_prev: list[mx.array],
    sigma_prev: list[float],
    sigma_t: float,
    order: int,
    variant: str,
    data_prediction: Denoiser,
    use_corrector: bool,
) -> tuple[mx.array, mx.array | None]:
    """One UniPC-bh step from sigma_prev[-1] to sigma_t (in VP form), corrected unless told not to."""
    lambda_prev_0, lambda_t = _lambda(sigma_prev[-1]), _lambda(sigma_t)
    h = lambda_t - lambda_prev_0
    model_prev_0 = model_prev[-1]
    rks, d1s = [], []
    for i in range(1, order):
        rk = (_lambda(sigma_prev[-(i + 1)]) - lambda_prev_0) / h
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
    rks.append(1.0)
    h_phi_1, b, b_h = _coefficients(-h, order, variant)  # x0-prediction works with hh = -h
    powers = np.stack([np.array(rks) ** (i - 1) for i in range(1, order + 1)])

    alpha_t = _alpha(sigma_t)
    std_ratio = (sigma_t * alpha_t) / (sigma_prev[-1] * _alpha(sigma_prev[-1]))
    x_t_base = x * std_ratio - model_prev_0 * (alpha_t * h_phi_1)

    prediction = x_t_base
    if d1s:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], b[:-1])
        prediction = x_t_base - sum(d * (alpha_t * b_h * float(r)) for r, d in zip(rhos_p, d1s, strict=True))
    if not use_corrector:
        return prediction, None

    rhos_c = [0.5] if order == 1 else np.linalg.solve(powers, b)
    model_t = data_prediction(prediction, sigma_t)
    correction = (model_t - model_prev_0) * float(rhos_c[-1])
    for r, d in zip(rhos_c[:-1], d1s, strict=True):
        correction = correction + d * float(r)
    return x_t_base - correction * (alpha_t * b_h), model_t


def _sample_unipc(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    callback: StepCallback | None,
    cancel: CancelCheck | None,
    variant: str,
) -> mx.array:
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    times = list(sigmas)
    if times[-1] == 0:
        times[-1] = _FINAL_SIGMA
    steps = len(times) - 1
    order = max(1, min(3, len(times) - 2))

    def data_prediction(x_vp: mx.array, sigma: float) -> mx.array:
        return denoise(x_vp / _alpha(sigma), sigma)

    x = x * _alpha(times[0])
    model_prev = [data_prediction(x, times[0])]
    sigma_prev = [times[0]]
    for i in step_indices(times, cancel):
        if callback is not None:
            callback(i, x / _alpha(times[i]), model_prev[-1])
        step = i + 1
        step_order = min(order, step) if step < order else min(order, steps + 1 - step)
        x, model_x = _update(
            x, model_prev, sigma_prev, times[step], step_order, variant, data_prediction, step != steps
        )
        if step < steps:
            if model_x is None:
                model_x = data_prediction(x, times[step])
            model_prev = (model_prev + [model_x])[-order:]
            sigma_prev = (sigma_prev + [times[step]])[-order:]
    return x / _alpha(times[-1])


def sample_uni_pc(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """UniPC with B(h) = h (ComfyUI's ``uni_pc``)."""
    return _sample_unipc(denoise, x, sigmas, callback, cancel, "bh1")


def sample_uni_pc_bh2(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """UniPC with B(h) = e^h - 1 (ComfyUI's ``uni_pc_bh2``)."""
    return _sample_unipc(denoise, x, sigmas, callback, cancel, "bh2")
