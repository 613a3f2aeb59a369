"""The SDE samplers against a torch transcription of ComfyUI's (comfy/k_diffusion/sampling.py, EPS models).

Both sides run the same closed-form Gaussian denoiser; ComfyUI's side draws its noise from torchsde 0.2.6
through ComfyUI's BrownianTreeNoiseSampler (cpu=True), ours from its default noise, so equal outputs mean
equal noise as well as equal update rules.
"""

import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch

torchsde = pytest.importorskip("torchsde")

from sd.sampling.model_sampling import SD1_MODEL_SAMPLING  # noqa: E402
from sd.sampling.samplers import get_sampler  # noqa: E402
from sd.sampling.schedulers import ksampler_sigmas  # noqa: E402

MU, S = 0.3, 0.5


def torch_denoiser(x, sigma):
    return (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)


def mlx_denoiser(x, sigma):
    return (S * S * x + sigma * sigma * MU) / (S * S + sigma * sigma)


class ComfyTreeNoise:
    """BatchedBrownianTree + BrownianTreeNoiseSampler as ComfyUI builds them for an int seed, cpu=True."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        self.tree = torchsde.BrownianTree(sigma_min, torch.zeros_like(x), sigma_max, entropy=seed)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        return self.tree(a.float(), b.float()) * sign / (t1 - t0).abs().sqrt()


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def comfy_dpmpp_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lambda_t - lambda_s
            lambda_s_1 = lambda_s + r * h
            fac = 1 / (2 * r)
            sigma_s_1 = lambda_s_1.neg().exp()
            alpha_s = sigmas[i] * lambda_s.exp()
            alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
            lambda_s_1_ = sd.log().neg()
            h_ = lambda_s_1_ - lambda_s
            x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
            x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
            denoised_2 = model(x_2, sigma_s_1)
            sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
            lambda_t_ = sd.log().neg()
            h_ = lambda_t_ - lambda_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def comfy_dpmpp_2m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def comfy_dpmpp_3m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


COMFY = {
    "dpmpp_sde": comfy_dpmpp_sde,
    "dpmpp_2m_sde": comfy_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": lambda *a: comfy_dpmpp_2m_sde(*a, solver_type="heun"),
    "dpmpp_3m_sde": comfy_dpmpp_3m_sde,
}


@pytest.mark.parametrize("name", list(COMFY))
@pytest.mark.parametrize(
    ("scheduler", "steps", "seed"), [("karras", 8, 0), ("normal", 6, 2**64 - 1), ("simple", 5, 77)]
)
def test_sde_samplers_equal_comfyui_with_torchsde_noise(name, scheduler, steps, seed):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, scheduler, steps, 1.0, name)
    x_t = (np.random.default_rng(seed % 2**32).standard_normal((1, 4, 6, 5)) * sigmas[0] + MU).astype(
        np.float32
    )
    sig_t = torch.from_numpy(sigmas)
    x = torch.from_numpy(x_t)
    noise = ComfyTreeNoise(x, sig_t[sig_t > 0].min(), sig_t.max(), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = COMFY[name](torch_denoiser, x, sig_t, noise).numpy().transpose(0, 2, 3, 1)
    ours = get_sampler(name)(mlx_denoiser, mx.array(x_t.transpose(0, 2, 3, 1)), sigmas, seed=seed)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.array(ours), expected, rtol=0, atol=2e-5 * max(1.0, scale))
    # ... and the noise mattered: a different seed gives a visibly different result.
    other = get_sampler(name)(mlx_denoiser, mx.array(x_t.transpose(0, 2, 3, 1)), sigmas, seed=seed ^ 1)
    assert np.abs(np.array(other) - expected).max() > 1e-2
    assert math.isfinite(scale)
