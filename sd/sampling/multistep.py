"""More of ComfyUI's samplers (comfy/k_diffusion/sampling.py), for eps models (alpha = 1 in their VP forms).

Deterministic: ``ipndm`` / ``ipndm_v`` (improved pseudo-numerical Adams-Bashforth steps in sigma, fixed and
variable step), ``res_multistep`` (second-order exponential multistep, arXiv 2308.02157),
``gradient_estimation`` (Euler plus a correction from the change of the derivative, arXiv openreview
o2ND9v0CeK), ``heunpp2``, ``deis`` (tAB). Stochastic: ``res_multistep_ancestral``, ``ddpm``, ``er_sde``
(ER-SDE-Solver-3, arXiv 2309.06169), ``seeds_2`` / ``seeds_3`` (SEEDS, arXiv 2305.14267); their per-step
noise is ComfyUI's default (sd/sampling/noise.py). The sampler contract is in sd/sampling/common.py.
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
    get_ancestral_step,
    sigma_list,
    step_indices,
    t_of,
    to_d,
)
from sd.sampling.noise import NoiseSampler

_IPNDM_ORDER = 4
_ADAMS_BASHFORTH = {2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _ipndm_coefficients(order: int, sigmas: list[float], i: int, variable: bool) -> list[float]:
    """Weights of d_i, d_{i-1}, ... in iPNDM's step (Adams-Bashforth, for variable steps in iPNDM-v)."""
    if order == 1:
        return [1.0]
    if not variable:
        return _ADAMS_BASHFORTH[order]
    h_n, h_1 = sigmas[i + 1] - sigmas[i], sigmas[i] - sigmas[i - 1]
    if order == 2:
        return [(2 + h_n / h_1) / 2, -(h_n / h_1) / 2]
    h_2 = sigmas[i - 1] - sigmas[i - 2]
    temp1 = (1 - h_n / (3 * (h_n + h_1)) * (h_n * (h_n + h_1)) / (h_1 * (h_1 + h_2))) / 2
    if order == 3:
        return [(2 + h_n / h_1) / 2 + temp1, -(h_n / h_1) / 2 - (1 + h_1 / h_2) * temp1, temp1 * h_1 / h_2]
    h_3 = sigmas[i - 2] - sigmas[i - 3]
    temp2 = (1 - h_n / (3 * (h_n + h_1))) / 2 + (1 - h_n / (2 * (h_n + h_1))) * h_n / (6 * (h_n + h_1 + h_2))
    temp2 *= (h_n * (h_n + h_1) * (h_n + h_1 + h_2)) / (h_1 * (h_1 + h_2) * (h_1 + h_2 + h_3))
    ratio = h_1 * (h_1 + h_2) / (h_2 * (h_2 + h_3))
    return [
        (2 + h_n / h_1) / 2 + temp1 + temp2,
        -(h_n / h_1) / 2 - (1 + h_1 / h_2) * temp1 - (1 + h_1 / h_2 + ratio) * temp2,
        temp1 * h_1 / h_2 + (h_1 / h_2 + ratio * (1 + h_2 / h_3)) * temp2,
        -temp2 * ratio * h_1 / h_2,
    ]


def _ipndm(denoise, x, sigmas, callback, cancel, max_order: int, variable: bool) -> mx.array:
    sigmas = sigma_list(sigmas)
    history: list[mx.array] = []  # newest last
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            weights = _ipndm_coefficients(order, sigmas, i, variable)
            slope = d * weights[0]
            for weight, old in zip(weights[1:], reversed(history), strict=False):
                slope = slope + old * weight
            x_next = x + slope * (sigmas[i + 1] - sigmas[i])
        history = (history + [d])[-(max_order - 1) :]
        x = x_next
    return x


def sample_ipndm(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    max_order: int = _IPNDM_ORDER,
) -> mx.array:
    """iPNDM: Adams-Bashforth in sigma with fixed-step weights, order rising to 4 (zju-pi diff-solvers)."""
    return _ipndm(denoise, x, sigmas, callback, cancel, max_order, variable=False)


def sample_ipndm_v(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    max_order: int = _IPNDM_ORDER,
) -> mx.array:
    """iPNDM-v: as iPNDM with weights for the actual (variable) step sizes."""
    return _ipndm(denoise, x, sigmas, callback, cancel, max_order, variable=True)


def _phi1(t: float) -> float:
    return math.expm1(t) / t


def _phi2(t: float) -> float:
    return (_phi1(t) - 1.0) / t


def _res_multistep(denoise, x, sigmas, callback, cancel, noise_sampler, seed, eta, s_noise,
                   cfg_pp: bool = False) -> mx.array:
    """ComfyUI's res_multistep loop; with `cfg_pp` the CFG++ form: the exponential step on the unconditional
    predictions, from x moved by the step's guidance (denoised - uncond)."""
    sigmas = sigma_list(sigmas)
    if cfg_pp:
        from sd.sampling.guidance import with_uncond

        both = with_uncond(denoise)
    noise_sampler = ancestral_noise(x, noise_sampler, seed) if eta else None
    old_base, old_sigma_down = None, None  # base: the prediction the step integrates (uncond for CFG++)
    for i in step_indices(sigmas, cancel):
        if cfg_pp:
            denoised, base = both(x, sigmas[i])
        else:
            denoised = base = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_down == 0 or old_base is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], base) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = t_of(sigmas[i]), t_of(sigma_down)
            h = t_next - t
            c2 = (t_of(sigmas[i - 1]) - t_of(old_sigma_down)) / h
            phi1, phi2 = _phi1(-h), _phi2(-h)
            if cfg_pp:
                x = x + (denoised - base)
            x = x * math.exp(-h) + (base * (phi1 - phi2 / c2) + old_base * (phi2 / c2)) * h
        if sigmas[i + 1] > 0 and noise_sampler is not None and sigma_up:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * sigma_up)
        old_base, old_sigma_down = base, sigma_down
    return x


def sample_res_multistep(
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
    """RES second-order multistep (exponential integrator in log-sigma, previous denoised as second point)."""
    return _res_multistep(denoise, x, sigmas, callback, cancel, noise_sampler, seed, 0.0, s_noise)


def sample_res_multistep_ancestral(
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
    """RES multistep down to sigma_down, then fresh noise up to the next sigma."""
    return _res_multistep(denoise, x, sigmas, callback, cancel, noise_sampler, seed, eta, s_noise)


def sample_gradient_estimation(
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
    """Euler steps plus (ge_gamma - 1) times the change of the derivative since the last step."""
    sigmas = sigma_list(sigmas)
    old_d = None
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if old_d is not None:
                x = x + (d - old_d) * ((ge_gamma - 1) * dt)
        old_d = d
    return x


def sample_ddpm(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """DDPM ancestral steps (Ho et al. 2020) in the variance-preserving form, with fresh noise each step."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    for i in step_indices(sigmas, cancel):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        eps = (x - denoised) / sigma
        alpha_cumprod, alpha_cumprod_prev = 1 / (sigma * sigma + 1), 1 / (sigma_prev * sigma_prev + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        x_vp = x / math.sqrt(1.0 + sigma * sigma)
        mu = (x_vp - eps * ((1 - alpha) / math.sqrt(1 - alpha_cumprod))) * math.sqrt(1.0 / alpha)
        if sigma_prev > 0:
            spread = math.sqrt((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod))
            mu = mu + noise_sampler(sigma, sigma_prev) * spread
            x = mu * math.sqrt(1.0 + sigma_prev * sigma_prev)
        else:
            x = mu
    return x


_ER_SDE_POINTS = 200


def _er_sde_scaler(value):
    return value * (np.exp(value**0.3) + 10.0)


def sample_er_sde(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    s_noise: float = 1.0,
    max_stage: int = 3,
) -> mx.array:
    """ER-SDE-Solver-3 (VP): up to third-order stages, integrals by ComfyUI's 200-point Riemann sums."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    points = np.arange(_ER_SDE_POINTS, dtype=np.float64)
    old_denoised = old_denoised_d = None
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigmas[i], sigmas[i + 1]  # sigma / alpha: sigma itself for eps models
            r = float(_er_sde_scaler(lam_t) / _er_sde_scaler(lam_s))
            x = x * r + denoised * (1 - r)
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / _ER_SDE_POINTS
                positions = lam_t + points * step
                scaled = _er_sde_scaler(positions)
                s = float(np.sum(1 / scaled) * step)
                denoised_d = (denoised - old_denoised) / (lam_s - sigmas[i - 1])
                x = x + denoised_d * (dt + s * float(_er_sde_scaler(lam_t)))
                if stage >= 3:
                    s_u = float(np.sum((positions - lam_s) / scaled) * step)
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - sigmas[i - 2]) / 2)
                    x = x + denoised_u * (dt**2 / 2 + s_u * float(_er_sde_scaler(lam_t)))
                old_denoised_d = denoised_d
            if s_noise > 0:
                spread = math.sqrt(max(lam_t**2 - lam_s**2 * r**2, 0.0))
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * spread)
        old_denoised = denoised
    return x


def sample_seeds_2(
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
    solver_type: str = "phi_1",
) -> mx.array:
    """SEEDS-2 (data prediction): a stochastic stage at ratio r of the step, then the full step from the two
    predictions mixed (``phi_1``) or weighted by the second exponential integrator term (``phi_2``)."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("seeds_2's solver_type must be 'phi_1' or 'phi_2'")
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = t_of(sigmas[i]), t_of(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sigma_mid = math.exp(-(lam_s + r * h))
        x_2 = x * (sigma_mid / sigmas[i] * math.exp(-r * h * eta)) - denoised * math.expm1(-r * h_eta)
        if inject:
            sde_noise = noise_sampler(sigmas[i], sigma_mid) * math.sqrt(-math.expm1(-2 * r * h * eta))
            x_2 = x_2 + sde_noise * (sigma_mid * s_noise)
        denoised_2 = denoise(x_2, sigma_mid)
        decay = sigmas[i + 1] / sigmas[i] * math.exp(-h * eta)
        if solver_type == "phi_1":
            denoised_d = denoised + (denoised_2 - denoised) * fac
            x = x * decay - denoised_d * math.expm1(-h_eta)
        else:
            b2 = _ei_phi2(-h_eta) / r
            x = x * decay - (denoised * (_ei_phi1(-h_eta) - b2) + denoised_2 * b2)
        if inject:
            segment = (r - 1) * h * eta
            sde_noise = sde_noise * math.exp(segment)
            fresh = noise_sampler(sigma_mid, sigmas[i + 1]) * math.sqrt(-math.expm1(2 * segment))
            sde_noise = sde_noise + fresh
            x = x + sde_noise * (sigmas[i + 1] * s_noise)
    return x


def sample_exp_heun_2_x0(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """Exponential Heun (second order, data prediction, in log-sigma): seeds_2 with r = 1, phi_2, no noise."""
    return sample_seeds_2(denoise, x, sigmas, callback=callback, cancel=cancel, seed=seed, eta=0.0,
                          s_noise=0.0, r=1.0, solver_type="phi_2")


def sample_exp_heun_2_x0_sde(
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
    """Stochastic exponential Heun: seeds_2 with r = 1 and phi_2."""
    return sample_seeds_2(denoise, x, sigmas, callback=callback, noise_sampler=noise_sampler, cancel=cancel,
                          seed=seed, eta=eta, s_noise=s_noise, r=1.0, solver_type="phi_2")


def _ei_phi1(h: float) -> float:
    return math.expm1(h)  # h * phi_1(h)


def _ei_phi2(h: float) -> float:
    return (math.expm1(h) - h) / h  # h * phi_2(h)


def sample_seeds_3(
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
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
) -> mx.array:
    """SEEDS-3: stochastic stages at ratios r_1 and r_2 of the step, then the full step (3 evaluations)."""
    sigmas = sigma_list(sigmas)
    noise_sampler = ancestral_noise(x, noise_sampler, seed)
    inject = eta > 0 and s_noise > 0

    def carried(noise, segment: float, sigma_from: float, sigma_to: float):
        fresh = noise_sampler(sigma_from, sigma_to) * math.sqrt(-math.expm1(2 * segment))
        return noise * math.exp(segment) + fresh

    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = t_of(sigmas[i]), t_of(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sigma_1, sigma_2 = math.exp(-(lam_s + r_1 * h)), math.exp(-(lam_s + r_2 * h))
        x_2 = x * (sigma_1 / sigmas[i] * math.exp(-r_1 * h * eta)) - denoised * _ei_phi1(-r_1 * h_eta)
        if inject:
            sde_noise = noise_sampler(sigmas[i], sigma_1) * math.sqrt(-math.expm1(-2 * r_1 * h * eta))
            x_2 = x_2 + sde_noise * (sigma_1 * s_noise)
        denoised_2 = denoise(x_2, sigma_1)
        a3_2 = r_2 / r_1 * _ei_phi2(-r_2 * h_eta)
        a3_1 = _ei_phi1(-r_2 * h_eta) - a3_2
        x_3 = x * (sigma_2 / sigmas[i] * math.exp(-r_2 * h * eta)) - (denoised * a3_1 + denoised_2 * a3_2)
        if inject:
            sde_noise = carried(sde_noise, (r_1 - r_2) * h * eta, sigma_1, sigma_2)
            x_3 = x_3 + sde_noise * (sigma_2 * s_noise)
        denoised_3 = denoise(x_3, sigma_2)
        b3 = _ei_phi2(-h_eta) / r_2
        b1 = _ei_phi1(-h_eta) - b3
        x = x * (sigmas[i + 1] / sigmas[i] * math.exp(-h * eta)) - (denoised * b1 + denoised_3 * b3)
        if inject:
            sde_noise = carried(sde_noise, (r_2 - 1) * h * eta, sigma_2, sigmas[i + 1])
            x = x + sde_noise * (sigmas[i + 1] * s_noise)
    return x


def sample_heunpp2(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
) -> mx.array:
    """Heun++ (sd-webui-samplers-scheduler): the slope mixes derivatives at this, the next and the one after
    next sigma, weighted by those sigmas over 3 * sigma_max; Heun's mix one step from the end, then Euler."""
    sigmas = sigma_list(sigmas)
    s_end = sigmas[-1]
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], denoise(x_3, sigmas[i + 2]))
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + (d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
    return x


# DEIS ("tab" mode, zju-pi diff-sampler as ComfyUI ships it): sigmas are mapped to the time t of a VP SDE
# fitted to EDM's range (these constants, whatever the model's), and each step's weights are integrals over
# [t_i, t_{i+1}] of the Lagrange basis times the VP integrand, by a Riemann sum over this many points.
_DEIS_POINTS = 10_000
_DEIS_EPSILON_S, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX = 1e-3, 0.002, 80.0


def deis_coefficients(sigmas: list[float], max_order: int) -> list[list[float]]:
    """Per step, the weights of d_i, d_{i-1}, ... (empty for the Euler steps)."""
    log_max = math.log(_DEIS_SIGMA_MAX**2 + 1)
    beta_d = 2 * (math.log(_DEIS_SIGMA_MIN**2 + 1) / _DEIS_EPSILON_S - log_max) / (_DEIS_EPSILON_S - 1)
    beta_min = log_max - 0.5 * beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    t = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log(s * s + 1)) - beta_min) / beta_d for s in sigmas]
    out: list[list[float]] = []
    for i in range(len(sigmas) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sigmas[i + 1] <= 0:  # the last step to 0 is Euler
            out.append([])
            continue
        taus = np.linspace(t[i], t[i + 1], _DEIS_POINTS)
        dtau = (t[i + 1] - t[i]) / _DEIS_POINTS
        alpha = np.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        integrand = 0.5 * (taus * (beta_1 - beta_0) + beta_0) / np.sqrt(alpha * (1 - alpha))
        nodes = [t[i - k] for k in range(order)]
        weights = []
        for j in range(order):
            basis = np.ones_like(taus)
            for k in range(order):
                if k != j:
                    basis *= (taus - nodes[k]) / (nodes[j] - nodes[k])
            weights.append(float(np.sum(integrand * basis) * dtau))
        out.append(weights)
    return out


def sample_deis(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    max_order: int = 3,
) -> mx.array:
    """DEIS (tAB, arXiv 2204.13902): multistep with weights integrated in the VP time of each step."""
    sigmas = sigma_list(sigmas)
    coefficients = deis_coefficients(sigmas, max_order)
    history: list[mx.array] = []
    for i in step_indices(sigmas, cancel):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        weights = coefficients[i]
        if not weights:
            x_next = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x_next = x + d * weights[0]
            for weight, old in zip(weights[1:], reversed(history), strict=False):
                x_next = x_next + old * weight
        history = (history + [d])[-(max_order - 1) :]
        x = x_next
    return x
