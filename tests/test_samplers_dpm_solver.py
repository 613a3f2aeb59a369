"""dpm_fast and dpm_adaptive (sd/sampling/dpm_solver.py) against a torch transcription of k-diffusion's
DPMSolver as ComfyUI ships it (comfy/k_diffusion/sampling.py) and its ksampler() wrapper (the range
[last nonzero sigma, sigmas[0]], len(sigmas) - 1 evaluations for dpm_fast), on the closed-form denoiser with
the same noise; then their accuracy on that denoiser's exact ODE solution.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_samplers import exact_flow, gaussian_denoiser, relative_error, start_latent
from test_samplers_more import Replay, get_ancestral_step, torch_denoiser

from sd.sampling.model_sampling import SD1_MODEL_SAMPLING
from sd.sampling.samplers import SAMPLERS, get_sampler
from sd.sampling.schedulers import ksampler_sigmas


class ComfyDPMSolver:
    def __init__(self, model):
        self.model, self.nfe = model, 0

    def t(self, sigma):
        return -sigma.log()

    def sigma(self, t):
        return t.neg().exp()

    def eps(self, eps_cache, key, x, t):
        if key in eps_cache:
            return eps_cache[key], eps_cache
        self.nfe += 1
        eps = (x - self.model(x, self.sigma(t))) / self.sigma(t)
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        x_2 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, eps_cache = self.eps(eps_cache, "eps_r2", u2, s2)
        x_3 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))
        return x_3, eps_cache

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta, s_noise, noise_sampler):
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i in range(len(orders)):
            eps_cache = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.0
            eps, eps_cache = self.eps(eps_cache, "eps", x, t)
            if orders[i] == 1:
                x, eps_cache = self.dpm_solver_1_step(x, t, t_next_, eps_cache=eps_cache)
            elif orders[i] == 2:
                x, eps_cache = self.dpm_solver_2_step(x, t, t_next_, eps_cache=eps_cache)
            else:
                x, eps_cache = self.dpm_solver_3_step(x, t, t_next_, eps_cache=eps_cache)
            x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                            pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0,
                            noise_sampler=None):
        h_init = abs(h_init)
        atol, rtol = torch.tensor(atol), torch.tensor(rtol)
        s, x_prev = t_start, x
        pid = ComfyPID(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        accepted = 0
        while s < t_end - 1e-5:
            eps_cache = {}
            t = torch.minimum(t_end, s + pid.h)
            if eta:
                sd, su = get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            eps, eps_cache = self.eps(eps_cache, "eps", x, s)
            if order == 2:
                x_low, eps_cache = self.dpm_solver_1_step(x, s, t_, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_2_step(x, s, t_, eps_cache=eps_cache)
            else:
                x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                accepted += 1
        return x, accepted


class ComfyPID:
    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps, self.errs = accept_safety, eps, []

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def comfy_ksampler_range(sigmas):
    """ComfyUI's ksampler() wrapper: sigma_min is the last sigma, or the one before a final 0."""
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    return sigma_min, sigmas[0]


def comfy_dpm_fast(model, x, sigmas, noise_sampler, eta=0.0, s_noise=1.0):
    sigma_min, sigma_max = comfy_ksampler_range(sigmas)
    solver = ComfyDPMSolver(model)
    t_start, t_end = solver.t(torch.as_tensor(sigma_max)), solver.t(torch.as_tensor(sigma_min))
    out = solver.dpm_solver_fast(x, t_start, t_end, len(sigmas) - 1, eta, s_noise, noise_sampler)
    assert solver.nfe == len(sigmas) - 1
    return out


def comfy_dpm_adaptive(model, x, sigmas, noise_sampler, **options):
    sigma_min, sigma_max = comfy_ksampler_range(sigmas)
    solver = ComfyDPMSolver(model)
    t_start, t_end = solver.t(torch.as_tensor(sigma_max)), solver.t(torch.as_tensor(sigma_min))
    out, _ = solver.dpm_solver_adaptive(x, t_start, t_end, noise_sampler=noise_sampler, **options)
    return out


CASES = [
    ("dpm_fast", comfy_dpm_fast, {}),
    ("dpm_fast", comfy_dpm_fast, {"eta": 1.0}),
    ("dpm_adaptive", comfy_dpm_adaptive, {}),
    ("dpm_adaptive", comfy_dpm_adaptive, {"order": 2, "rtol": 0.02}),
    ("dpm_adaptive", comfy_dpm_adaptive, {"eta": 0.7}),
]


@pytest.mark.parametrize(("name", "comfy", "options"), CASES)
@pytest.mark.parametrize(("scheduler", "steps"), [("karras", 7), ("normal", 10), ("exponential", 9)])
def test_dpm_solvers_equal_comfyui(name, comfy, options, scheduler, steps):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, scheduler, steps, 1.0, name)
    x_t = (np.random.default_rng(1).standard_normal((1, 4, 6, 5)) * sigmas[0] + 0.3).astype(np.float32)
    replay = Replay(x_t.shape, 5)
    expected = comfy(torch_denoiser, torch.from_numpy(x_t), torch.from_numpy(sigmas), replay.torch, **options)
    expected = expected.numpy().transpose(0, 2, 3, 1)
    torch_draws, replay.next = replay.next, 0
    x = mx.array(x_t.transpose(0, 2, 3, 1))
    ours = np.array(get_sampler(name)(gaussian_denoiser, x, sigmas, noise_sampler=replay.ours, **options))
    if options.get("eta"):
        assert replay.next == torch_draws  # the same draws (with eta 0 ComfyUI draws and multiplies by 0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-5 * max(1.0, float(np.abs(expected).max())))


def _error_at_range_end(name, steps, **options):
    """Error against the exact ODE solution at the schedule's last nonzero sigma (where these stop)."""
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", steps, 1.0, name)
    x_t = start_latent(float(sigmas[0]))
    out = np.array(get_sampler(name)(gaussian_denoiser, mx.array(x_t), sigmas, **options))
    exact = exact_flow(x_t.astype(np.float64), float(sigmas[0]), float(sigmas[-2]))
    return np.abs(out - exact).max() / np.abs(exact - 0.3).max()


def test_dpm_fast_converges_at_third_order():
    # 3k + 2 evaluations: k third-order steps and one of second order, the step halving as k + 1 doubles
    # (3k and 3k + 1 end in a first-order step, which caps the global order at 2)
    errors = [relative_error("dpm_fast", n) for n in (11, 23, 47, 95)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[2] / errors[3] >= 7.0, errors
    assert errors[3] < 5e-5, errors


def test_dpm_adaptive_error_follows_its_tolerance():
    loose = _error_at_range_end("dpm_adaptive", 10, rtol=0.05, atol=0.0078)
    tight = _error_at_range_end("dpm_adaptive", 10, rtol=0.0005, atol=0.0001)
    assert tight < loose / 5 and tight < 1e-3, (loose, tight)


def test_dpm_solvers_are_listed_after_lms_as_in_comfyui():
    assert SAMPLERS.index("lms") + 1 == SAMPLERS.index("dpm_fast") == SAMPLERS.index("dpm_adaptive") - 1
