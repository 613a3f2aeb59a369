"""Sigma tables vs independent references.

The references below are ComfyUI's / k-diffusion's published formulas (``ModelSamplingDiscrete``,
``calculate_sigmas``, ``get_sigmas_karras``, ``get_sigmas_exponential``, ``normal_scheduler``,
``simple_scheduler``, ``ddim_scheduler``, ``beta_scheduler``, ``KSampler.set_steps``) written
again here, independently of sd/, and evaluated with torch (beta quantiles with mpmath).
Where diffusers' EulerDiscreteScheduler has the same semantics (karras; normal when the
timesteps fall on integers) it is used as a second, third-party reference.
"""

import math

import mpmath
import numpy as np
import pytest
import torch

from sd.sampling.model_sampling import ModelSamplingDiscrete
from sd.sampling.schedulers import SCHEDULERS, beta_ppf, ksampler_sigmas, regularized_incomplete_beta


class TorchModelSampling:
    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        s = ((1 - ac) / ac) ** 0.5
        self.sigmas = s.float()
        self.log_sigmas = s.log().float()

    def timestep(self, sigma):
        d = sigma.log() - self.log_sigmas[:, None]
        return d.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, t):
        t = torch.clamp(t.float(), 0, 999)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


REF = TorchModelSampling()
SMIN, SMAX = float(REF.sigmas[0]), float(REF.sigmas[-1])


def ref_beta_ppf(q, a=0.6, b=0.6):
    if q >= 1:
        return 1.0
    return float(
        mpmath.findroot(
            lambda x: mpmath.betainc(a, b, 0, x, regularized=True) - q,
            (1e-12, 1 - 1e-12),
            solver="anderson",
            tol=1e-24,
        )
    )


def ref_schedule(name, n):
    if name == "karras":
        ramp = torch.linspace(0, 1, n)
        s = (SMAX ** (1 / 7) + ramp * (SMIN ** (1 / 7) - SMAX ** (1 / 7))) ** 7
        return torch.cat([s, torch.zeros(1)])
    if name == "exponential":
        return torch.cat([torch.linspace(math.log(SMAX), math.log(SMIN), n).exp(), torch.zeros(1)])
    if name in ("normal", "sgm_uniform"):
        start, end = REF.timestep(torch.tensor(SMAX)), REF.timestep(torch.tensor(SMIN))
        ts = (
            torch.linspace(start, end, n + 1)[:-1] if name == "sgm_uniform" else torch.linspace(start, end, n)
        )
        return torch.tensor([float(REF.sigma(t)) for t in ts] + [0.0])
    if name == "simple":
        ss = 1000 / n
        return torch.tensor([float(REF.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if name == "ddim_uniform":
        ss = max(1000 // n, 1)
        return torch.tensor([0.0] + [float(REF.sigmas[i]) for i in range(1, 1000, ss)]).flip(0)
    if name == "beta":
        ts = [round(ref_beta_ppf(1 - i / n) * 999) for i in range(n)]
        out = []
        for i, t in enumerate(ts):
            if i == 0 or t != ts[i - 1]:
                out.append(float(REF.sigmas[t]))
        return torch.tensor(out + [0.0])
    if name == "linear_quadratic":  # comfy/samplers.py linear_quadratic_schedule (threshold 0.025)
        if n == 1:
            return torch.FloatTensor([1.0, 0.0]) * torch.tensor(SMAX, dtype=torch.float32)
        lin = n // 2
        diff = lin - 0.025 * n
        quad = n - lin
        qc, lc = diff / (lin * quad**2), 0.025 / lin - 2 * diff / quad**2
        fractions = [i * 0.025 / lin for i in range(lin)]
        fractions += [qc * i * i + lc * i + qc * lin * lin for i in range(lin, n)]
        top = torch.tensor(SMAX, dtype=torch.float32)
        return torch.FloatTensor([1.0 - f for f in fractions + [1.0]]) * top
    if name == "kl_optimal":  # comfy/samplers.py kl_optimal_scheduler (one step: NaN there, [max, 0] here)
        idx = torch.arange(n, dtype=torch.float).div_(max(n - 1, 1))
        out = torch.zeros(n + 1)
        out[:-1] = (idx * math.atan(float(MS.sigma_min)) + (1 - idx) * math.atan(float(MS.sigma_max))).tan_()
        return out
    raise AssertionError(name)


def ref_ksampler(name, steps, denoise, discard=False):
    def full(n):
        if discard:
            s = ref_schedule(name, n + 1)
            return torch.cat([s[:-2], s[-1:]])
        return ref_schedule(name, n)

    if denoise > 0.9999:
        return full(steps)
    return full(int(steps / denoise))[-(steps + 1) :]


MS = ModelSamplingDiscrete()


def test_sigma_table_and_timestep_maps():
    np.testing.assert_allclose(MS.sigmas, REF.sigmas.numpy(), rtol=1e-6)
    assert MS.sigma_min == pytest.approx(0.0292, abs=1e-4) and MS.sigma_max == pytest.approx(
        14.6146, abs=1e-3
    )
    probe = torch.tensor([0.03, 0.5, 1.0, 3.3, 14.0, 20.0, 0.01])
    np.testing.assert_array_equal(MS.timestep(probe.numpy()), REF.timestep(probe).numpy())
    t = torch.tensor([0.0, 0.5, 10.25, 500.7, 998.99, 999.0])
    np.testing.assert_allclose(MS.sigma(t.numpy()), REF.sigma(t).numpy(), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 37])
@pytest.mark.parametrize("denoise", [1.0, 0.75, 0.3])
def test_schedule_matches_reference(name, steps, denoise):
    ours = ksampler_sigmas(MS, name, steps, denoise)
    expected = ref_ksampler(name, steps, denoise).numpy()
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["normal", "karras"])
def test_discard_penultimate_sigma_samplers(name):
    ours = ksampler_sigmas(MS, name, 10, 1.0, sampler_name="dpm_2")
    np.testing.assert_allclose(ours, ref_ksampler(name, 10, 1.0, discard=True).numpy(), rtol=1e-5)
    assert len(ours) == 11
    assert len(ksampler_sigmas(MS, name, 10, 1.0, sampler_name="euler")) == 11


def test_denoise_zero_gives_no_sigmas():
    assert ksampler_sigmas(MS, "normal", 20, 0.0).shape == (0,)


def test_denoise_tail_rule_by_hand():
    full = ksampler_sigmas(MS, "karras", int(10 / 0.6), 1.0)  # 16 steps
    np.testing.assert_array_equal(ksampler_sigmas(MS, "karras", 10, 0.6), full[-11:])


def test_beta_distribution_inverse_cdf_against_mpmath():
    for a, b in [(0.6, 0.6), (2.0, 5.0), (0.5, 3.0)]:
        for x in [1e-6, 0.01, 0.3, 0.5, 0.77, 0.999]:
            expected = float(mpmath.betainc(a, b, 0, x, regularized=True))
            assert regularized_incomplete_beta(x, a, b) == pytest.approx(expected, abs=1e-13)
        for q in [1e-4, 0.1, 0.5, 0.9, 0.9999]:
            assert float(mpmath.betainc(a, b, 0, beta_ppf(q, a, b), regularized=True)) == pytest.approx(
                q, abs=1e-12
            )


# diffusers takes the cumulative product of alphas in float32 (ComfyUI in float64), which moves
# its sigma table by up to 1.3e-5 relative; hence a looser tolerance against diffusers only.
DIFFUSERS_RTOL = 3e-5


@pytest.mark.parametrize("steps", [4, 10, 28])
def test_normal_matches_diffusers_euler_where_timesteps_are_integers(steps):
    # diffusers interpolates linearly in sigma, ComfyUI in log-sigma: they agree on integer timesteps.
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace"
    )
    sched.set_timesteps(steps)
    np.testing.assert_allclose(
        ksampler_sigmas(MS, "normal", steps), sched.sigmas.numpy(), rtol=DIFFUSERS_RTOL
    )


@pytest.mark.parametrize("steps", [5, 20])
def test_karras_matches_diffusers_euler_karras(steps):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    sched.set_timesteps(steps)
    np.testing.assert_allclose(
        ksampler_sigmas(MS, "karras", steps), sched.sigmas.numpy(), rtol=DIFFUSERS_RTOL
    )
