"""k-diffusion's DPM-Solver (Lu et al. 2022, arXiv 2206.00927) as ComfyUI runs it: ``dpm_fast`` (fixed steps
of order 3, 3, ..., spending exactly the schedule's step count in model evaluations) and ``dpm_adaptive``
(embedded 2(3) pairs with a PID step-size controller). Both work in t = -log sigma on the eps prediction.

They take a noise *range*, not a schedule: as ComfyUI's ``ksampler()`` wraps them, the range is
[last nonzero sigma, first sigma] of the given sigmas (so they stop at sigma_min, not 0) and dpm_fast gets
len(sigmas) - 1 evaluations. The sampler contract is in sd/sampling/common.py; the callback sees
ComfyUI's step index (fewer steps than sigmas for dpm_fast; attempted steps for dpm_adaptive, clamped to
the schedule's length here so progress stays within its total).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from sd.errors import Cancelled
from sd.sampling.common import (
    CancelCheck,
    Denoiser,
    Sigmas,
    StepCallback,
    ancestral_noise,
    get_ancestral_step,
    sigma_list,
    sigma_of,
    t_of,
)
from sd.sampling.noise import NoiseSampler


class _Solver:
    """One run's model in DPM-Solver's terms: eps(x, t), cached per step under a key as k-diffusion does."""

    def __init__(self, denoise: Denoiser):
        self.denoise = denoise

    def eps(self, cache: dict, key: str, x: mx.array, t: float) -> mx.array:
        if key not in cache:
            sigma = sigma_of(t)
            cache[key] = (x - self.denoise(x, sigma)) / sigma
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        eps = self.eps(cache, "eps", x, t)
        return x - eps * (sigma_of(t_next) * math.expm1(t_next - t))

    def step_2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - eps * (sigma_of(s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sigma_next = sigma_of(t_next)
        correction = (eps_r1 - eps) * (sigma_next / (2 * r1) * math.expm1(h))
        return x - eps * (sigma_next * math.expm1(h)) - correction

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - eps * (sigma_of(s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - eps * (sigma_of(s2) * math.expm1(r2 * h))
              - (eps_r1 - eps) * (sigma_of(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sigma_next = sigma_of(t_next)
        correction = (eps_r2 - eps) * (sigma_next / r2 * (math.expm1(h) / h - 1))
        return x - eps * (sigma_next * math.expm1(h)) - correction


def _f32(value: float) -> float:
    """A time rounded to float32, where k-diffusion holds it in a float32 tensor (its grid of t accumulates
    in float32: rounding the same way keeps dpm_adaptive's steps on ComfyUI's)."""
    return float(np.float32(value))


def schedule_range(sigmas: list[float]) -> tuple[float, float]:
    """ComfyUI's (sigma_min, sigma_max) for these samplers: the last sigma, or the one before a final 0."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError("dpm_fast / dpm_adaptive need sigma_min and sigma_max above 0")
    return sigma_min, sigmas[0]


def _cancel_check(cancel: CancelCheck | None, i: int) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"sampling cancelled before step {i + 1}")


def _noisy_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """Where the deterministic part of a step ends and how much noise goes back in (eta > 0)."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(sigma_of(t), sigma_of(t_next), eta)
    t_down = min(t_end, t_of(sigma_down))
    return t_down, max(sigma_of(t_next) ** 2 - sigma_of(t_down) ** 2, 0.0) ** 0.5


def sample_dpm_fast(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> mx.array:
    """DPM-Solver-fast: len(sigmas) - 1 evaluations in steps of order 3 (then 2, 1) uniform in log sigma."""
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = schedule_range(sigmas)
    nfe = len(sigmas) - 1
    t_start, t_end = _f32(t_of(sigma_max)), _f32(t_of(sigma_min))
    m = nfe // 3 + 1
    ts = [_f32(v) for v in np.linspace(t_start, t_end, m + 1)]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    noise_sampler = ancestral_noise(x, noise_sampler, seed) if eta else None
    solver = _Solver(denoise)
    for i, order in enumerate(orders):
        _cancel_check(cancel, i)
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_target, sigma_up = _noisy_target(t, t_next, t_end, eta)
        eps = solver.eps(cache, "eps", x, t)
        if callback is not None:
            callback(i, x, x - eps * sigma_of(t))
        step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
        x = step(x, t, t_target, cache)
        if noise_sampler is not None:
            x = x + noise_sampler(sigma_of(t), sigma_of(t_next)) * (sigma_up * s_noise)
    return x


class PIDStepSizeController:
    """k-diffusion's PID controller for the step size h (accepts a step when its factor >= accept_safety)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1.0, accept_safety=0.81, eps=1e-8):
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(
    denoise: Denoiser,
    x: mx.array,
    sigmas: Sigmas,
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    cancel: CancelCheck | None = None,
    seed: int = 0,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> mx.array:
    """DPM-Solver-12/23 with adaptive steps from sigma_max down to sigma_min (the step count is its own)."""
    if order not in (2, 3):
        raise ValueError("dpm_adaptive's order should be 2 or 3")
    sigmas = sigma_list(sigmas)
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = schedule_range(sigmas)
    t_start, t_end = _f32(t_of(sigma_max)), _f32(t_of(sigma_min))
    noise_sampler = ancestral_noise(x, noise_sampler, seed) if eta else None
    solver = _Solver(denoise)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev, steps = t_start, x, 0
    scale = 1 / math.sqrt(x.size)
    while s < t_end - 1e-5:
        _cancel_check(cancel, steps)
        cache: dict = {}
        t = min(t_end, _f32(s + pid.h))
        t_target, sigma_up = _noisy_target(s, t, t_end, eta)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - eps * sigma_of(s)
        if order == 2:
            x_low = solver.step_1(x, s, t_target, cache)
            x_high = solver.step_2(x, s, t_target, cache)
        else:
            x_low = solver.step_2(x, s, t_target, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_target, cache)
        delta = mx.maximum(atol, rtol * mx.maximum(mx.abs(x_low), mx.abs(x_prev)))
        error = mx.sqrt(mx.sum(mx.square((x_low - x_high) / delta))).item() * scale
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if noise_sampler is not None:
                x = x + noise_sampler(sigma_of(s), sigma_of(t)) * (sigma_up * s_noise)
            s = t
        steps += 1
        if callback is not None:
            callback(min(steps - 1, len(sigmas) - 2), x, denoised)
    return x
