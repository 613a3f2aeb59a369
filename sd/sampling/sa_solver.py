"""SA-Solver (stochastic Adams predictor-corrector, Xue et al., NeurIPS 2023, arXiv 2309.05019) as ComfyUI
ships it (comfy/k_diffusion/sa_solver.py and sample_sa_solver in sampling.py), for eps models (alpha = 1,
lambda = -log sigma).

Each step predicts with a stochastic Adams-Bashforth combination of the last denoised predictions (order
up to 3) and, from the second step, corrects the previous prediction with an Adams-Moulton combination that
includes the newest one (order up to 4); ``sa_solver_pece`` evaluates the model again on the corrected
state. The weights are integrals of the Lagrange basis in lambda against exp((1 + tau^2) lambda), solved
from a Vandermonde system. The stochasticity tau is 1 for sigmas between the model's 20% and 80% points
(ComfyUI's default interval) and 0 outside, where the steps are the ODE's. The sampler contract is in
sd/sampling/common.py.
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


def percent_to_sigma(model_sampling: ModelSamplingDiscrete, percent: float) -> float:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma: the sigma `percent` of the way through sampling."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(model_sampling.sigma((1.0 - percent) * 999.0))


def exponential_coefficients(s: float, t: float, order: int, tau: float) -> np.ndarray:
    """(1 + tau^2) * integral over [s, t] of exp((1 + tau^2) x) x^p dx, for p < order, with exp((1 + tau^2) t)
    factored out: integration by parts as a lower-triangular recursion."""
    tau_mul = 1 + tau**2
    p = np.arange(order, dtype=np.float64)
    products = t**p - s**p * math.exp(-tau_mul * (t - s))
    depth = p[:, None] - p[None, :]
    log_factorial = np.array([math.lgamma(k + 1) for k in p])
    log_coeff = log_factorial[:, None] - log_factorial[None, :]
    if tau > 0:
        log_coeff = log_coeff - depth * math.log(tau_mul)
    signs = np.where(depth % 2 == 0, 1.0, -1.0)
    return np.tril(np.exp(log_coeff) * signs) @ products


def adams_coefficients(sigma_next: float, lambdas: np.ndarray, lambda_s: float, lambda_t: float, tau: float,
                       simple_order_2: bool = False, corrector: bool = False) -> np.ndarray:
    """The weights b_i of the predictions at `lambdas` (oldest first) for a step from lambda_s to lambda_t."""
    tau_mul = 1 + tau**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * math.exp(lambda_t)
    if simple_order_2 and len(lambdas) == 2:  # the paper's simplified order-2 weights (its Appendix D)
        if corrector:
            b_1 = alpha_t * (0.5 * tau_mul * h)
            b_2 = alpha_t * -math.expm1(-h * tau_mul) - b_1
        else:
            b_2 = alpha_t * (0.5 * tau_mul * h**2) / (lambdas[-2] - lambda_s)
            b_1 = alpha_t * -math.expm1(-h * tau_mul) - b_2
        return np.array([b_2, b_1])
    integrals = exponential_coefficients(lambda_s, lambda_t, len(lambdas), tau)
    vandermonde_t = np.vander(lambdas, len(lambdas), increasing=True).T
    return alpha_t * np.linalg.solve(vandermonde_t, integrals)


def _combine(predictions: list[mx.array], weights: np.ndarray) -> mx.array:
    out = predictions[0] * float(weights[0])
    for prediction, weight in zip(predictions[1:], weights[1:], strict=True):
        out = out + prediction * float(weight)
    return out


def sample_sa_solver(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    model_sampling: ModelSamplingDiscrete = SD1_MODEL_SAMPLING,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
    tau_interval: tuple[float, float] | None = None,
) -> mx.array:
    """SA-Solver: stochastic Adams predictor (order 3) and corrector (order 4). `tau_interval` (sigma_start,
    sigma_end) is where tau = 1; by default the model's 20% and 80% points (ComfyUI's)."""
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    start_sigma, end_sigma = tau_interval or (percent_to_sigma(model_sampling, 0.2),
                                              percent_to_sigma(model_sampling, 0.8))

    def tau_of(sigma: float) -> float:
        return 1.0 if start_sigma >= sigma >= end_sigma else 0.0

    max_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau, noise = 0.0, 0.0, None
    predictions: list[mx.array] = []
    lower_order_to_end = sigmas[-1] == 0  # lower the orders near the end, for stability
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x_pred, sigmas[i])
        if callback is not None:
            callback(i, x_pred, denoised)
        predictions = (predictions + [denoised])[-max_order:]
        p_order = min(predictor_order, len(predictions))
        correct = i > 0 and (sigmas[i + 1] > 0 or use_pece)
        c_order = min(corrector_order, len(predictions)) if correct else 0
        if lower_order_to_end:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)

        if c_order == 0:  # take the prediction as it is
            x = x_pred
        else:
            points = np.array(lambdas[i - c_order + 1 : i + 1])
            weights = adams_coefficients(sigmas[i], points, lambdas[i - 1], lambdas[i], tau, simple_order_2,
                                         corrector=True)
            decay = sigmas[i] / sigmas[i - 1] * math.exp(-(tau**2) * h)
            x = x * decay + _combine(predictions[-c_order:], weights)
            if tau > 0 and s_noise > 0:
                x = x + noise  # the noise the predictor added, again
            if use_pece:
                denoised = denoise(x, sigmas[i])
                predictions[-1] = denoised

        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_of(sigmas[i + 1])
            points = np.array(lambdas[i - p_order + 1 : i + 1])
            weights = adams_coefficients(sigmas[i + 1], points, lambdas[i], lambdas[i + 1], tau,
                                         simple_order_2, corrector=False)
            h = lambdas[i + 1] - lambdas[i]
            decay = sigmas[i + 1] / sigmas[i] * math.exp(-(tau**2) * h)
            x_pred = x * decay + _combine(predictions[-p_order:], weights)
            if tau > 0 and s_noise > 0:
                spread = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h)) * s_noise
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * spread
                x_pred = x_pred + noise
    return x_pred


def sample_sa_solver_pece(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    model_sampling: ModelSamplingDiscrete = SD1_MODEL_SAMPLING,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    simple_order_2: bool = False,
    tau_interval: tuple[float, float] | None = None,
) -> mx.array:
    """SA-Solver in PECE mode: predict, evaluate, correct, evaluate again (two model calls a step)."""
    return sample_sa_solver(denoise, x, sigmas, callback=callback, noise_sampler=noise_sampler, cancel=cancel,
                            seed=seed, model_sampling=model_sampling, s_noise=s_noise,
                            predictor_order=predictor_order, corrector_order=corrector_order, use_pece=True,
                            simple_order_2=simple_order_2, tau_interval=tau_interval)
