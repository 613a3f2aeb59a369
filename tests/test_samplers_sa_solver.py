"""sa_solver and sa_solver_pece (sd/sampling/sa_solver.py) against a torch transcription of ComfyUI's
sample_sa_solver and comfy/k_diffusion/sa_solver.py (eps models) on the closed-form denoiser with the same
noise; then the ODE form (tau 0 everywhere) converging at high order, and the SDE form giving the data
distribution.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_samplers import MU, S, exact_flow, gaussian_denoiser, relative_error, start_latent
from test_samplers_more import Replay, torch_denoiser

from sd.sampling.model_sampling import SD1_MODEL_SAMPLING
from sd.sampling.sa_solver import percent_to_sigma
from sd.sampling.samplers import SAMPLERS, get_sampler
from sd.sampling.schedulers import ksampler_sigmas


def comfy_exponential_coeffs(s, t, solver_order, tau_t):
    tau_mul = 1 + tau_t**2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype)
    product_terms_factored = t**p - s**p * (-tau_mul * h).exp()
    recursive_depth_mat = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    recursive_coeff_mat = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        recursive_coeff_mat = recursive_coeff_mat - (recursive_depth_mat * math.log(tau_mul))
    signs = torch.where(recursive_depth_mat % 2 == 0, 1.0, -1.0)
    recursive_coeff_mat = (recursive_coeff_mat.exp() * signs).tril()
    return recursive_coeff_mat @ product_terms_factored


def comfy_simple_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector_step=False):
    tau_mul = 1 + tau_t**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if is_corrector_step:
        b_1 = alpha_t * (0.5 * tau_mul * h)
        b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
    else:
        b_2 = alpha_t * (0.5 * tau_mul * h**2) / (curr_lambdas[-2] - lambda_s)
        b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
    return torch.stack([b_2, b_1])


def comfy_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2=False,
                   is_corrector_step=False):
    num_timesteps = curr_lambdas.shape[0]
    if simple_order_2 and num_timesteps == 2:
        return comfy_simple_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector_step)
    exp_integral_coeffs = comfy_exponential_coeffs(lambda_s, lambda_t, num_timesteps, tau_t)
    vandermonde_matrix_t = torch.vander(curr_lambdas, num_timesteps, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_matrix_t, exp_integral_coeffs)
    return sigma_next * lambda_t.exp() * lagrange_integrals


def comfy_sa_solver(model, x, sigmas, noise_sampler, s_noise=1.0, predictor_order=3, corrector_order=4,
                    use_pece=False, simple_order_2=False):
    lambdas = sigmas.log().neg()
    start_sigma = percent_to_sigma(SD1_MODEL_SAMPLING, 0.2)  # model_sampling.percent_to_sigma
    end_sigma = percent_to_sigma(SD1_MODEL_SAMPLING, 0.8)

    def tau_func(sigma):
        sigma = sigma.item()
        return 1.0 if start_sigma >= sigma >= end_sigma else 0.0

    max_used_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau_t, noise, pred_list = 0.0, 0.0, 0.0, []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i])
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        if corrector_order_used == 0:
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1 : i + 1]
            b_coeffs = comfy_b_coeffs(sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t,
                                      simple_order_2, is_corrector_step=True)
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i])
                pred_list[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1 : i + 1]
            b_coeffs = comfy_b_coeffs(sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1], tau_t,
                                      simple_order_2, is_corrector_step=False)
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise)
                x_pred = x_pred + noise
    return x_pred


CASES = [
    ("sa_solver", {}),
    ("sa_solver_pece", {}),
    ("sa_solver", {"simple_order_2": True, "predictor_order": 2, "corrector_order": 2}),
    ("sa_solver", {"predictor_order": 1, "corrector_order": 1}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize(("scheduler", "steps"), [("karras", 7), ("normal", 10), ("exponential", 12)])
def test_sa_solver_equals_comfyui(name, options, scheduler, steps):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, scheduler, steps, 1.0, name)
    x_t = (np.random.default_rng(1).standard_normal((1, 4, 6, 5)) * sigmas[0] + MU).astype(np.float32)
    replay = Replay(x_t.shape, 5)
    expected = comfy_sa_solver(torch_denoiser, torch.from_numpy(x_t), torch.from_numpy(sigmas), replay.torch,
                               use_pece=name == "sa_solver_pece", **options)
    expected = expected.numpy().transpose(0, 2, 3, 1)
    torch_draws, replay.next = replay.next, 0
    x = mx.array(x_t.transpose(0, 2, 3, 1))
    ours = np.array(get_sampler(name)(gaussian_denoiser, x, sigmas, noise_sampler=replay.ours, **options))
    assert replay.next == torch_draws > 0  # the same noise draws, in the stochastic interval
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_as_an_ode_converges_at_high_order(name, monkeypatch):
    import functools

    import sd.sampling.samplers as registry

    ode = functools.partial(registry._SAMPLER_FUNCTIONS[name], tau_interval=(-1.0, -1.0))  # tau 0 everywhere
    monkeypatch.setitem(registry._SAMPLER_FUNCTIONS, name, ode)
    errors = [relative_error(name, n) for n in (10, 20, 40, 80)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[1] / errors[2] >= 6.0, errors
    assert errors[3] < 1e-4, errors


@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_gives_the_data_distribution(name):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", 30, 1.0, name)
    x_t = start_latent(float(sigmas[0]), shape=(1, 128, 128, 4))
    out = np.array(get_sampler(name)(gaussian_denoiser, mx.array(x_t), sigmas, seed=3))
    assert abs(out.mean() - MU) < 0.01
    assert abs(out.std() - S) < 0.015, out.std()
    assert np.abs(out - exact_flow(x_t, float(sigmas[0]), 0.0)).mean() > 0.05  # fresh noise went in


def test_default_tau_interval_is_comfyuis_20_to_80_percent():
    # ModelSamplingDiscrete.percent_to_sigma: sigma((1 - percent) * 999) on SD1's table
    assert percent_to_sigma(SD1_MODEL_SAMPLING, 0.2) == pytest.approx(float(SD1_MODEL_SAMPLING.sigma(799.2)))
    assert percent_to_sigma(SD1_MODEL_SAMPLING, 0.8) == pytest.approx(float(SD1_MODEL_SAMPLING.sigma(199.8)))
    assert 0.2 < percent_to_sigma(SD1_MODEL_SAMPLING, 0.8) < 1.0 < percent_to_sigma(SD1_MODEL_SAMPLING, 0.2)


def test_sa_solvers_are_listed_after_seeds_3_as_in_comfyui():
    index = SAMPLERS.index
    assert index("seeds_3") + 1 == index("sa_solver") == index("sa_solver_pece") - 1
