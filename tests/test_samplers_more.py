"""The samplers and schedules added after the first fifteen (sd/sampling/multistep.py, schedulers.py).

Each is checked twice: on the closed-form Gaussian denoiser of tests/test_samplers.py (convergence order for
the deterministic ones, the data distribution for the stochastic ones), and against a torch transcription
of ComfyUI's function (comfy/k_diffusion/sampling.py, eps models) fed the same noise.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_samplers import MU, S, exact_flow, gaussian_denoiser, relative_error, start_latent

from sd.sampling.model_sampling import SD1_MODEL_SAMPLING
from sd.sampling.samplers import SAMPLERS, get_sampler
from sd.sampling.schedulers import calculate_sigmas, ksampler_sigmas

ORDERS = [  # (sampler, minimum error ratio 40 -> 80 steps, error bound at 80 steps)
    ("ipndm", 3.5, 1e-3),  # fixed-step Adams weights on uneven steps: second order
    ("ipndm_v", 4.5, 1e-3),  # variable-step weights: higher order
    ("res_multistep", 3.5, 1e-3),
    ("gradient_estimation", 1.8, 3e-2),
    ("heunpp2", 1.8, 3e-2),  # its sigma-weighted slope mix is first order
    ("deis", 6.0, 2e-4),  # third order
    ("exp_heun_2_x0", 3.5, 1e-3),  # second order
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "min_ratio", "bound"), ORDERS)
def test_new_deterministic_samplers_converge_at_their_order(name, min_ratio, bound):
    errors = [relative_error(name, n) for n in (10, 20, 40, 80)]
    assert errors[0] > errors[2] > errors[3]
    assert errors[2] / errors[3] >= min_ratio, errors
    assert errors[3] < bound, errors


STOCHASTIC = [
    ("ddpm", 100, 0.03),
    ("er_sde", 50, 0.015),
    ("seeds_2", 50, 0.015),
    ("seeds_3", 50, 0.015),
    ("exp_heun_2_x0_sde", 50, 0.015),
    ("res_multistep_ancestral", 50, 0.02),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps", "tolerance"), STOCHASTIC)
def test_new_stochastic_samplers_give_the_data_distribution(name, steps, tolerance):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", steps, 1.0, name)
    x_t = start_latent(float(sigmas[0]), shape=(1, 128, 128, 4))
    out = np.array(get_sampler(name)(gaussian_denoiser, mx.array(x_t), sigmas, seed=3))
    assert abs(out.mean() - MU) < 0.01
    assert abs(out.std() - S) < tolerance, out.std()
    assert np.abs(out - exact_flow(x_t, float(sigmas[0]), 0.0)).mean() > 0.05  # fresh noise went in


# --- torch transcriptions of ComfyUI's functions (alpha = 1, lambda = -log sigma for eps models) ------


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def comfy_ipndm(model, x, sigmas, noise, variable=False, max_order=4):
    buffer_model = []
    x_next = x
    t_steps = sigmas
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif not variable:
            if order == 2:
                x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buffer_model[-1]) / 2
            elif order == 3:
                x_next = (
                    x_cur
                    + (t_next - t_cur) * (23 * d_cur - 16 * buffer_model[-1] + 5 * buffer_model[-2]) / 12
                )
            else:
                x_next = (
                    x_cur
                    + (t_next - t_cur)
                    * (55 * d_cur - 59 * buffer_model[-1] + 37 * buffer_model[-2] - 9 * buffer_model[-3])
                    / 24
                )
        else:
            h_n = t_next - t_cur
            h_n_1 = t_cur - t_steps[i - 1]
            if order == 2:
                coeff1 = (2 + (h_n / h_n_1)) / 2
                coeff2 = -(h_n / h_n_1) / 2
                x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1])
            elif order == 3:
                h_n_2 = t_steps[i - 1] - t_steps[i - 2]
                temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
                coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
                coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
                coeff3 = temp * h_n_1 / h_n_2
                x_next = x_cur + (t_next - t_cur) * (
                    coeff1 * d_cur + coeff2 * buffer_model[-1] + coeff3 * buffer_model[-2]
                )
            else:
                h_n_2 = t_steps[i - 1] - t_steps[i - 2]
                h_n_3 = t_steps[i - 2] - t_steps[i - 3]
                temp1 = (
                    1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))
                ) / 2
                temp2 = (
                    (1 - h_n / (3 * (h_n + h_n_1))) / 2
                    + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
                ) * (
                    (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                    / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
                )
                ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
                coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
                coeff2 = (
                    -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2
                )
                coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
                coeff4 = -temp2 * ratio * h_n_1 / h_n_2
                x_next = x_cur + (t_next - t_cur) * (
                    coeff1 * d_cur
                    + coeff2 * buffer_model[-1]
                    + coeff3 * buffer_model[-2]
                    + coeff4 * buffer_model[-3]
                )
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur
        else:
            buffer_model.append(d_cur)
    return x_next


def comfy_res_multistep(model, x, sigmas, noise_sampler, eta=0.0, s_noise=1.0):
    def phi1_fn(t):
        return torch.expm1(t) / t

    def phi2_fn(t):
        return (phi1_fn(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = sigmas[i].log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0 and eta:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def comfy_gradient_estimation(model, x, sigmas, noise, ge_gamma=2.0):
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def comfy_ddpm(model, x, sigmas, noise_sampler):
    def step(x, sigma, sigma_prev, noise):
        alpha_cumprod = 1 / ((sigma * sigma) + 1)
        alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
        if sigma_prev > 0:
            mu += ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise_sampler(
                sigma, sigma_prev
            )
        return mu

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], (x - denoised) / sigmas[i])
        if sigmas[i + 1] != 0:
            x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def comfy_er_sde(model, x, sigmas, noise_sampler, s_noise=1.0, max_stage=3):
    def scaler(v):
        return v * ((v**0.3).exp() + 10.0)

    point_indice = torch.arange(0, 200.0, dtype=torch.float32)
    er_lambdas = sigmas  # exp(-half_log_snr) = sigma for eps models
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            r = scaler(er_lambda_t) / scaler(er_lambda_s)
            x = r * x + (1 - r) * denoised
            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / 200.0
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + (dt + s * scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3:
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + ((dt**2) / 2 + s_u * scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            spread = (er_lambda_t**2 - er_lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x


def comfy_seeds_2(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    def ei_h_phi_1(h):
        return torch.expm1(h)

    def ei_h_phi_2(h):
        return (torch.expm1(h) - h) / h

    inject_noise = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = lambda_s_1.neg().exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - torch.expm1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - torch.expm1(-h_eta) * denoised_d
        else:
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def comfy_seeds_3(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    def ei_h_phi_1(h):
        return torch.expm1(h)

    def ei_h_phi_2(h):
        return (torch.expm1(h) - h) / h

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = lambda_s_1.neg().exp(), lambda_s_2.neg().exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - ei_h_phi_1(-r_1 * h_eta) * denoised
        sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
        x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1)
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - (a3_1 * denoised + a3_2 * denoised_2)
        segment_factor = (r_1 - r_2) * h * eta
        sde_noise = sde_noise * segment_factor.exp()
        sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
            sigma_s_1, sigma_s_2
        )
        x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2)
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - (b1 * denoised + b3 * denoised_3)
        segment_factor = (r_2 - 1) * h * eta
        sde_noise = sde_noise * segment_factor.exp()
        sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
            sigma_s_2, sigmas[i + 1]
        )
        x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def comfy_heunpp2(model, x, sigmas, noise_sampler):
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]  # s_churn = 0: no noise added
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            w = 2 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w1 = 1 - w2
            x = x + (d * w1 + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            dt_2 = sigmas[i + 2] - sigmas[i + 1]
            x_3 = x_2 + d_2 * dt_2
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2]))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            x = x + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return x


def comfy_deis_coeff_list(t_steps, max_order, N=10000):
    def vp_sigma_inv(beta_d, beta_min):
        return lambda sigma: ((beta_min**2 + 2 * beta_d * (sigma**2 + 1).log()).sqrt() - beta_min) / beta_d

    epsilon_s, sigma_min, sigma_max = 1e-3, 0.002, 80
    log_min = torch.log(torch.tensor(sigma_min) ** 2 + 1)
    log_max = torch.log(torch.tensor(sigma_max) ** 2 + 1)
    vp_beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    vp_beta_min = log_max - 0.5 * vp_beta_d
    t_steps = vp_sigma_inv(vp_beta_d.clone(), vp_beta_min.clone())(t_steps.clone())
    beta_0, beta_1 = vp_beta_min, vp_beta_d + vp_beta_min

    def integrand_fn(taus):
        taus = taus.clone().requires_grad_(True)
        with torch.enable_grad():
            alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
            alpha.log().sum().backward()
        return -0.5 * taus.grad / torch.sqrt(alpha.detach() * (1 - alpha.detach()))

    C = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        order = min(i + 1, max_order)
        if order == 1:
            C.append([])
            continue
        taus = torch.linspace(t_cur, t_next, N)
        dtau = (t_next - t_cur) / N
        prev_t = t_steps[[i - k for k in range(order)]]
        integrand = integrand_fn(taus)
        coeff_temp = []
        for j in range(order):
            poly = 1
            for k in range(prev_t.shape[0]):
                if k != j:
                    poly *= (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
            coeff_temp.append(torch.sum(integrand * poly) * dtau)
        C.append(coeff_temp)
    return C


def comfy_deis(model, x, sigmas, noise_sampler, max_order=3):
    x_next = x
    coeff_list = comfy_deis_coeff_list(sigmas, max_order)
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            coeff_cur, coeff_prev1 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
        else:
            coeff_cur, coeff_prev1, coeff_prev2 = coeff_list[i]
            x_next = (
                x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2]
            )
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur
        else:
            buffer_model.append(d_cur)
    return x_next


COMFY = {
    "ipndm": comfy_ipndm,
    "ipndm_v": lambda *a: comfy_ipndm(*a, variable=True),
    "res_multistep": comfy_res_multistep,
    "res_multistep_ancestral": lambda *a: comfy_res_multistep(*a, eta=1.0),
    "gradient_estimation": comfy_gradient_estimation,
    "ddpm": comfy_ddpm,
    "er_sde": comfy_er_sde,
    "seeds_2": comfy_seeds_2,
    "exp_heun_2_x0": lambda *a: comfy_seeds_2(*a, eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2"),
    "exp_heun_2_x0_sde": lambda *a: comfy_seeds_2(*a, r=1.0, solver_type="phi_2"),
    "seeds_3": comfy_seeds_3,
    "heunpp2": comfy_heunpp2,
    "deis": comfy_deis,
}


def torch_denoiser(x, sigma):
    return (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)


class Replay:
    """The same sequence of standard normal arrays for both sides (NCHW for torch, NHWC for us)."""

    def __init__(self, shape_nchw, seed):
        self.rng, self.shape, self.drawn, self.next = np.random.default_rng(seed), shape_nchw, [], 0

    def _draw(self):
        if self.next == len(self.drawn):
            self.drawn.append(self.rng.standard_normal(self.shape).astype(np.float32))
        self.next += 1
        return self.drawn[self.next - 1]

    def torch(self, sigma, sigma_next):
        return torch.from_numpy(self._draw())

    def ours(self, sigma, sigma_next):
        return mx.array(self._draw().transpose(0, 2, 3, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMFY))
@pytest.mark.parametrize(("scheduler", "steps"), [("karras", 7), ("normal", 10), ("exponential", 4)])
def test_new_samplers_equal_comfyui(name, scheduler, steps):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, scheduler, steps, 1.0, name)
    x_t = (np.random.default_rng(1).standard_normal((1, 4, 6, 5)) * sigmas[0] + MU).astype(np.float32)
    replay = Replay(x_t.shape, 5)
    expected = COMFY[name](torch_denoiser, torch.from_numpy(x_t), torch.from_numpy(sigmas), replay.torch)
    expected = expected.numpy().transpose(0, 2, 3, 1)
    replay.next = 0
    x = mx.array(x_t.transpose(0, 2, 3, 1))
    ours = np.array(get_sampler(name)(gaussian_denoiser, x, sigmas, noise_sampler=replay.ours))
    assert replay.next == len(replay.drawn)  # the same number of noise draws
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))


def test_new_names_are_listed_in_comfyui_order():
    for name in COMFY:
        assert name in SAMPLERS
    assert (
        SAMPLERS.index("ddpm") < SAMPLERS.index("lcm") < SAMPLERS.index("ipndm") < SAMPLERS.index("seeds_2")
    )


# --- schedules ------------------------------------------------------------------------------------


def comfy_linear_quadratic(sigma_max, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sigma_schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_sigma_schedule = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic_sigma_schedule = [
            quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)
        ]
        sigma_schedule = linear_sigma_schedule + quadratic_sigma_schedule + [1.0]
        sigma_schedule = [1.0 - x for x in sigma_schedule]
    return torch.FloatTensor(sigma_schedule) * torch.tensor(sigma_max)


def comfy_kl_optimal(n, sigma_min, sigma_max):
    adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 33])
def test_linear_quadratic_equals_comfyui(steps):
    ms = SD1_MODEL_SAMPLING
    expected = comfy_linear_quadratic(np.float32(ms.sigma_max), steps).numpy()
    np.testing.assert_allclose(calculate_sigmas(ms, "linear_quadratic", steps), expected, rtol=1e-6)


@pytest.mark.parametrize("steps", [2, 5, 20, 33])
def test_kl_optimal_equals_comfyui(steps):
    ms = SD1_MODEL_SAMPLING
    expected = comfy_kl_optimal(steps, float(ms.sigma_min), float(ms.sigma_max)).numpy()
    ours = calculate_sigmas(ms, "kl_optimal", steps)
    np.testing.assert_allclose(ours, expected, rtol=2e-6)
    assert ours[0] == pytest.approx(float(ms.sigma_max), rel=1e-5) and ours[-1] == 0
