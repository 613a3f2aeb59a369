"""Samplers on a denoiser with a closed-form answer.

Data x0 ~ N(mu, s^2) per element. Its exact denoiser is D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2),
and the probability-flow ODE dx/dsigma = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2) has the
solution x(sigma) = mu + (x_T - mu) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2). Deterministic samplers
must converge to it at their order; stochastic ones must end with mean mu and standard deviation s.
Per-step noise is checked against torch.randn with ComfyUI's CPU seeding (seed + 1).
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.errors import Cancelled
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING
from sd.sampling.samplers import SAMPLERS, get_sampler, linear_multistep_coeff
from sd.sampling.schedulers import ksampler_sigmas

MU, S = 0.3, 0.5
SIGMA_END = 0.05


def gaussian_denoiser(x, sigma):
    return (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)


def exact_flow(x_t, sigma_t, sigma):
    return MU + (x_t - MU) * math.sqrt(S * S + sigma * sigma) / math.sqrt(S * S + sigma_t * sigma_t)


def start_latent(sigma_t, shape=(1, 8, 8, 4), seed=0):
    z = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return MU + math.sqrt(S * S + sigma_t * sigma_t) * z


def relative_error(name, steps):
    """Error at sigma_end > 0 after a log-uniform schedule (so no final jump to 0 hides the order)."""
    sigmas = np.exp(np.linspace(math.log(14.6), math.log(SIGMA_END), steps + 1)).astype(np.float32)
    x_t = start_latent(float(sigmas[0]))
    out = np.array(get_sampler(name)(gaussian_denoiser, mx.array(x_t), sigmas))
    exact = exact_flow(x_t.astype(np.float64), float(sigmas[0]), float(sigmas[-1]))
    return np.abs(out - exact).max() / np.abs(exact - MU).max()


# (sampler, minimum error ratio when the step count doubles from 40 to 80, error bound at 80 steps)
ORDERS = [
    ("euler", 1.8, 3e-2),  # first order
    ("ddim", 1.8, 3e-2),
    ("heun", 3.5, 1e-3),  # second order
    ("dpm_2", 3.5, 1e-3),
    ("dpmpp_2m", 3.5, 1e-3),
    ("lms", 6.0, 2e-4),  # fourth order (ratio still climbing towards 16 here)
    ("uni_pc", 3.5, 1e-4),  # third order, but the last steps drop to lower order (lower_order_final)
    ("uni_pc_bh2", 3.5, 1e-4),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "min_ratio", "bound"), ORDERS)
def test_deterministic_samplers_converge_at_their_order(name, min_ratio, bound):
    errors = [relative_error(name, n) for n in (10, 20, 40, 80)]
    assert errors[0] > errors[2] > errors[3]
    assert errors[2] / errors[3] >= min_ratio, errors
    assert errors[3] < bound, errors


@pytest.mark.parametrize("name", [n for n, _, _ in ORDERS])
def test_deterministic_samplers_reach_the_ode_solution_at_zero(name):
    bound = 5e-2 if name in ("euler", "ddim") else 5e-3  # first order vs higher order
    # KSampler's full schedule ending in sigma = 0 (karras, 50 steps).
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", 50, 1.0, name)
    x_t = start_latent(float(sigmas[0]))
    out = np.array(get_sampler(name)(gaussian_denoiser, mx.array(x_t), sigmas))
    exact = exact_flow(x_t.astype(np.float64), float(sigmas[0]), 0.0)
    assert np.abs(out - exact).max() / np.abs(exact - MU).max() < bound


# (sampler, steps, tolerance on the final standard deviation)
STOCHASTIC = [
    ("euler_ancestral", 100, 0.03),  # first order: visibly biased at 50 steps
    ("dpm_2_ancestral", 50, 0.015),
    ("dpmpp_2s_ancestral", 50, 0.015),
    ("dpmpp_sde", 50, 0.015),
    ("dpmpp_2m_sde", 50, 0.015),
    ("dpmpp_3m_sde", 50, 0.015),
]


SLOW_SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")  # 5-11 s each here: the slow tier


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps", "tolerance"), [
    pytest.param(*case, marks=pytest.mark.slow) if case[0] in SLOW_SDE else case for case in STOCHASTIC])
def test_stochastic_samplers_give_the_data_distribution(name, steps, tolerance):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", steps, 1.0, name)
    x_t = start_latent(float(sigmas[0]), shape=(1, 128, 128, 4))
    out = np.array(get_sampler(name)(gaussian_denoiser, mx.array(x_t), sigmas, seed=3))
    assert abs(out.mean() - MU) < 0.01
    assert abs(out.std() - S) < tolerance, out.std()
    # The output is not the deterministic flow of x_T: fresh noise went in.
    exact = exact_flow(x_t, float(sigmas[0]), 0.0)
    assert np.abs(out - exact).mean() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, _, _ in STOCHASTIC] + ["lcm"])
def test_stochastic_samplers_are_seeded(name):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", 6, 1.0, name)
    x_t = mx.array(start_latent(float(sigmas[0])))
    run = get_sampler(name)
    a, b, c = (np.array(run(gaussian_denoiser, x_t, sigmas, seed=seed)) for seed in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def torch_step_noise(seed, count, shape_nhwc):
    generator = torch.Generator().manual_seed(seed + 1)  # ComfyUI's default_noise_sampler on the CPU
    b, h, w, c = shape_nhwc
    return [
        torch.randn((b, c, h, w), generator=generator).numpy().transpose(0, 2, 3, 1) for _ in range(count)
    ]


def test_euler_ancestral_two_steps_by_hand():
    sigmas = np.array([10.0, 2.0, 0.0], dtype=np.float32)
    x_t = start_latent(10.0).astype(np.float64)
    (n1,) = torch_step_noise(11, 1, x_t.shape)
    sigma_up = math.sqrt(2.0**2 * (10.0**2 - 2.0**2) / 10.0**2)
    sigma_down = math.sqrt(2.0**2 - sigma_up**2)
    d = (x_t - gaussian_denoiser(x_t, 10.0)) / 10.0
    x1 = x_t + d * (sigma_down - 10.0) + n1 * sigma_up
    expected = gaussian_denoiser(x1, 2.0)  # the last step to 0 returns the prediction
    out = np.array(
        get_sampler("euler_ancestral")(gaussian_denoiser, mx.array(x_t.astype(np.float32)), sigmas, seed=11)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_lcm_two_steps_by_hand():
    sigmas = np.array([10.0, 2.0, 0.0], dtype=np.float32)
    x_t = start_latent(10.0).astype(np.float64)
    (n1,) = torch_step_noise(4, 1, x_t.shape)
    expected = gaussian_denoiser(gaussian_denoiser(x_t, 10.0) + 2.0 * n1, 2.0)
    out = np.array(get_sampler("lcm")(gaussian_denoiser, mx.array(x_t.astype(np.float32)), sigmas, seed=4))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_lms_coefficients_integrate_lagrange_polynomials_exactly():
    t = [10.0, 6.0, 3.5, 2.0, 1.0]
    # Order-3 coefficients at step 3 integrate the basis for nodes t3, t2, t1 over [t3, t4];
    # they must reproduce the integral of any quadratic exactly, e.g. f(tau) = tau^2.
    coeffs = [linear_multistep_coeff(3, t, 3, j) for j in range(3)]
    nodes = [t[3], t[2], t[1]]
    integral = sum(c * n * n for c, n in zip(coeffs, nodes, strict=True))
    assert integral == pytest.approx((t[4] ** 3 - t[3] ** 3) / 3, rel=1e-12)


# dpm_fast / dpm_adaptive step on their own grid (ComfyUI's callback sees their steps, not the schedule's)
OWN_STEPS = {"dpm_fast": [0, 1], "dpm_adaptive": None}


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_once_per_step_and_cancel_between_steps(name):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", 5, 1.0, name)
    x_t = mx.array(start_latent(float(sigmas[0])))
    seen = []
    get_sampler(name)(gaussian_denoiser, x_t, sigmas, callback=lambda i, x, d: seen.append(i))
    if name == "dpm_adaptive":  # its attempted steps, clamped to the schedule's last index
        assert seen[0] == 0 and seen == sorted(seen) and seen[-1] <= len(sigmas) - 2 and len(seen) > 3
    else:
        assert seen == OWN_STEPS.get(name, list(range(len(sigmas) - 1)))

    polls = []
    with pytest.raises(Cancelled):
        get_sampler(name)(gaussian_denoiser, x_t, sigmas, cancel=lambda: polls.append(1) or len(polls) > 1)
    assert len(polls) == 2


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler_magic")


# --- Third-party references: diffusers' schedulers, stepped with the same Gaussian model ----------
# diffusers works in the variance-preserving form x_vp = x / sqrt(1 + sigma^2) for DPM-Solver and
# UniPC, and in our (variance-exploding) form for Euler ancestral. We feed diffusers' own sigma
# tables to our samplers, so only the update rules are compared.


def _diffusers_scheduler(kind, **options):
    import warnings

    import diffusers

    warnings.simplefilter("ignore", DeprecationWarning)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return getattr(diffusers, kind)(**common, **options)


def _eps(x_ve, sigma):
    return (x_ve - gaussian_denoiser(x_ve, sigma)) / sigma


def _run_diffusers(scheduler, sigmas, x_ve, vp, generator=None):
    x = x_ve / math.sqrt(1 + sigmas[0] ** 2) if vp else x_ve
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(sigmas[i])
        current_ve = x * math.sqrt(1 + sigma**2) if vp else x
        eps = torch.tensor(_eps(current_ve, sigma))
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, torch.tensor(x), **kwargs).prev_sample.numpy()
    return x


def _nchw_start(sigma0, seed=0):
    z = np.random.default_rng(seed).standard_normal((1, 4, 8, 8))
    return MU + math.sqrt(S * S + sigma0 * sigma0) * z


def _ours(name, x_nchw, sigmas, **kw):
    x = mx.array(x_nchw.transpose(0, 2, 3, 1).astype(np.float32))
    return np.array(get_sampler(name)(gaussian_denoiser, x, sigmas.astype(np.float32), **kw)).transpose(
        0, 3, 1, 2
    )


@pytest.mark.parametrize("steps", [4, 9, 20])
def test_dpmpp_2m_matches_diffusers_dpm_solver_pp(steps):
    scheduler = _diffusers_scheduler(
        "DPMSolverMultistepScheduler",
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    x_t = _nchw_start(sigmas[0])
    expected = _run_diffusers(scheduler, sigmas, x_t, vp=True)
    np.testing.assert_allclose(_ours("dpmpp_2m", x_t, sigmas), expected, atol=5e-6)


@pytest.mark.parametrize(("name", "variant"), [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
@pytest.mark.parametrize("steps", [4, 9, 20])
def test_uni_pc_matches_diffusers_unipc(name, variant, steps):
    scheduler = _diffusers_scheduler(
        "UniPCMultistepScheduler",
        solver_order=3,
        solver_type=variant,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(steps)
    scheduler.sigmas[-1] = 0.001  # ComfyUI's UniPC stands in 0.001 for the final sigma 0
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    x_t = _nchw_start(sigmas[0])
    expected_vp = _run_diffusers(scheduler, sigmas, x_t, vp=True)
    ours_sigmas = sigmas.copy()
    ours_sigmas[-1] = 0.0
    ours = _ours(name, x_t, ours_sigmas) / math.sqrt(1 + 0.001**2)  # back to diffusers' VP form
    np.testing.assert_allclose(ours, expected_vp, atol=1e-5)


@pytest.mark.parametrize("steps", [3, 10])
def test_euler_ancestral_matches_diffusers_with_comfyui_cpu_noise(steps):
    seed = 1234
    scheduler = _diffusers_scheduler("EulerAncestralDiscreteScheduler")
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    x_t = _nchw_start(sigmas[0])
    # diffusers draws one randn per step from the generator: ComfyUI's CPU stream is seed + 1.
    generator = torch.Generator().manual_seed(seed + 1)
    expected = _run_diffusers(
        scheduler, sigmas, torch.tensor(x_t).float().numpy(), vp=False, generator=generator
    )
    np.testing.assert_allclose(_ours("euler_ancestral", x_t, sigmas, seed=seed), expected, atol=2e-5)


@pytest.mark.parametrize("steps", [4, 10])
def test_heun_matches_diffusers_heun(steps):
    scheduler = _diffusers_scheduler("HeunDiscreteScheduler", use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    interleaved = scheduler.sigmas.numpy().astype(np.float64)  # s0, s1, s1, s2, s2, ..., 0
    sigmas = np.concatenate([interleaved[:1], interleaved[1:-1:2], interleaved[-1:]])
    x_t = _nchw_start(sigmas[0])
    expected = _run_diffusers(scheduler, interleaved, x_t, vp=False)
    np.testing.assert_allclose(_ours("heun", x_t, sigmas), expected, atol=1e-5)


@pytest.mark.parametrize("steps", [4, 10])
def test_dpmpp_2m_sde_matches_diffusers_sde_dpm_solver_pp(steps):
    scheduler = _diffusers_scheduler(
        "DPMSolverMultistepScheduler",
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    x_t = _nchw_start(sigmas[0])
    expected = _run_diffusers(scheduler, sigmas, x_t, vp=True, generator=torch.Generator().manual_seed(7))
    # Replay diffusers' per-step noise (float32 randn from its generator) through our noise_sampler.
    replay = torch.Generator().manual_seed(7)

    def noise_sampler(sigma, sigma_next):
        return mx.array(torch.randn((1, 4, 8, 8), generator=replay).numpy().transpose(0, 2, 3, 1))

    np.testing.assert_allclose(
        _ours("dpmpp_2m_sde", x_t, sigmas, noise_sampler=noise_sampler), expected, atol=1e-5
    )
