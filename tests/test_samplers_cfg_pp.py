"""ComfyUI's CFG++ samplers (sd/sampling/cfg_pp.py) and the post-CFG capture they read the uncond through.

Each is checked against a torch transcription of ComfyUI's function (comfy/k_diffusion/sampling.py, eps
models) on a guided fake denoiser (CFG over two closed-form Gaussian denoisers, run through our real
cfg_function / post-CFG path) fed the same noise; the deterministic ones also converge at their order on the
closed-form denoiser of tests/test_samplers.py (where cond == uncond they are their plain samplers); and the
capture makes CFGDenoiser evaluate the negative at cfg 1, as ComfyUI's disable_cfg1_optimization does.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from comfy_conds_reference import B, C, D, H, L, W, fake_unet_mx
from test_samplers import relative_error
from test_samplers_more import Replay, get_ancestral_step, to_d

from sd.sampling.conds import as_entries, resolve
from sd.sampling.guidance import (
    NO_PATCHES,
    CFGDenoiser,
    DualCFGDenoiser,
    PerpNegDenoiser,
    cfg_function,
    with_uncond,
)
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING
from sd.sampling.samplers import SAMPLERS, get_sampler
from sd.sampling.schedulers import ksampler_sigmas

MU_C, MU_U, S_C, S_U = 0.3, -0.2, 0.5, 0.7  # the cond and uncond "data" of the fake guided model


def _gauss(x, sigma, mu, s):
    return (s * s * x + sigma * sigma * mu) / (s * s + sigma * sigma)


class GuidedGaussians:
    """A guided denoiser on closed-form predictions: CFG (and post-CFG patches) by sd/sampling/guidance.py."""

    def __init__(self, cfg, patches=NO_PATCHES):
        self.cfg, self.patches, self.calls = cfg, patches, 0

    def with_patches(self, extra):
        return GuidedGaussians(self.cfg, self.patches.then(extra))

    def __call__(self, x, sigma):
        self.calls += 1
        cond, uncond = _gauss(x, sigma, MU_C, S_C), _gauss(x, sigma, MU_U, S_U)
        return cfg_function(self.patches, cond, uncond, self.cfg, sigma, x, None)


class TorchGuided:
    """The model as ComfyUI's samplers see it: denoised out, uncond_denoised through the post-CFG hook."""

    def __init__(self, cfg):
        self.cfg, self.uncond = cfg, None

    def __call__(self, x, sigma):
        cond, uncond = _gauss(x, sigma, MU_C, S_C), _gauss(x, sigma, MU_U, S_U)
        self.uncond = uncond
        return uncond + (cond - uncond) * self.cfg


# --- torch transcriptions of ComfyUI's functions (alpha = 1, lambda = -log sigma) --------------------------


def comfy_euler_ancestral_cfg_pp(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], model.uncond)
            sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            x = denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        uncond = model.uncond
        guidance_vector = denoised - uncond
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], uncond) * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * 0.5).expm1() * uncond
            model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * model.uncond
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance_vector
    return x


def comfy_dpmpp_2m_cfg_pp(model, x, sigmas, noise_sampler):
    def t_fn(sigma):
        return sigma.log().neg()

    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        uncond = model.uncond
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def comfy_res_multistep_cfg_pp(model, x, sigmas, noise_sampler, eta=0.0, s_noise=1.0):
    def phi1_fn(t):
        return torch.expm1(t) / t

    def phi2_fn(t):
        return (phi1_fn(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        uncond = model.uncond
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
        else:
            t, t_old = sigmas[i].log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = x + (denoised - uncond)
            x = h.neg().exp() * x + h * (b1 * uncond + b2 * old_denoised)
        if sigmas[i + 1] > 0 and eta:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = uncond, sigma_down
    return x


def comfy_gradient_estimation_cfg_pp(model, x, sigmas, noise_sampler, ge_gamma=2.0):
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], model.uncond)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


COMFY = {
    "euler_cfg_pp": lambda *a: comfy_euler_ancestral_cfg_pp(*a, eta=0.0, s_noise=0.0),
    "euler_ancestral_cfg_pp": comfy_euler_ancestral_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": comfy_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": comfy_dpmpp_2m_cfg_pp,
    "res_multistep_cfg_pp": comfy_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": lambda *a: comfy_res_multistep_cfg_pp(*a, eta=1.0),
    "gradient_estimation_cfg_pp": comfy_gradient_estimation_cfg_pp,
}


@pytest.mark.parametrize("name", list(COMFY))
@pytest.mark.parametrize(("scheduler", "steps", "cfg"), [("karras", 7, 1.8), ("normal", 10, 1.0),
                                                          ("exponential", 4, 0.6)])
def test_cfg_pp_samplers_equal_comfyui(name, scheduler, steps, cfg):
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, scheduler, steps, 1.0, name)
    x_t = (np.random.default_rng(1).standard_normal((1, 4, 6, 5)) * sigmas[0]).astype(np.float32)
    replay = Replay(x_t.shape, 5)
    expected = COMFY[name](TorchGuided(cfg), torch.from_numpy(x_t), torch.from_numpy(sigmas), replay.torch)
    expected = expected.numpy().transpose(0, 2, 3, 1)
    torch_draws, replay.next = replay.next, 0
    x = mx.array(x_t.transpose(0, 2, 3, 1))
    ours = np.array(get_sampler(name)(GuidedGaussians(cfg), x, sigmas, noise_sampler=replay.ours))
    assert replay.next == torch_draws  # the same number of noise draws
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))


def test_cfg_pp_differs_from_the_plain_sampler_under_guidance():
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", 8, 1.0, "euler")
    x = mx.array(np.random.default_rng(2).standard_normal((1, 6, 5, 4)).astype(np.float32) * sigmas[0])
    plain = np.array(get_sampler("euler")(GuidedGaussians(3.0), x, sigmas))
    pp = np.array(get_sampler("euler_cfg_pp")(GuidedGaussians(3.0), x, sigmas))
    assert np.abs(plain - pp).mean() > 1e-2


ORDERS = [  # on a plain denoiser (cond == uncond) each is its plain sampler: (name, min ratio, bound)
    ("euler_cfg_pp", 1.8, 3e-2),
    ("dpmpp_2m_cfg_pp", 3.5, 1e-3),
    ("res_multistep_cfg_pp", 3.5, 1e-3),
    ("gradient_estimation_cfg_pp", 1.8, 3e-2),
]


@pytest.mark.parametrize(("name", "min_ratio", "bound"), ORDERS)
def test_deterministic_cfg_pp_samplers_converge_at_their_order(name, min_ratio, bound):
    errors = [relative_error(name, n) for n in (10, 20, 40, 80)]
    assert errors[0] > errors[2] > errors[3]
    assert errors[2] / errors[3] >= min_ratio, errors
    assert errors[3] < bound, errors


def _entries(n):
    rng = np.random.default_rng(8)
    sides = [as_entries([mx.array(rng.standard_normal((1, L, D)).astype(np.float32))], B) for _ in range(n)]
    return resolve(sides, (B, H, W, C), SD1_MODEL_SAMPLING)


@pytest.mark.parametrize("kind", ["dual_cfg", "perp_neg"])
def test_other_guiders_hand_their_negative_to_the_capture(kind):
    # ComfyUI's DualCFGGuider and PerpNegGuider give post-CFG functions the negative's prediction as uncond
    first, second, negative = _entries(3)
    if kind == "dual_cfg":
        guider = DualCFGDenoiser(fake_unet_mx, first, second, negative, 1.5, 2.0, SD1_MODEL_SAMPLING)
    else:
        guider = PerpNegDenoiser(fake_unet_mx, first, negative, second, 3.0, 1.0, SD1_MODEL_SAMPLING)
    sigma = float(SD1_MODEL_SAMPLING.sigmas[400])
    x = mx.array(np.random.default_rng(9).standard_normal((B, H, W, C)).astype(np.float32))
    denoised, uncond = with_uncond(guider)(x, sigma)
    np.testing.assert_allclose(np.array(denoised), np.array(guider(x, sigma)), atol=1e-6)
    alone = CFGDenoiser(fake_unet_mx, negative, [], 1.0, SD1_MODEL_SAMPLING)(x, sigma)
    np.testing.assert_allclose(np.array(uncond), np.array(alone), atol=1e-5)


def _cfg_denoiser(cfg, with_negative=True, calls=None):
    rng = np.random.default_rng(4)
    ctx = [mx.array(rng.standard_normal((1, L, D)).astype(np.float32)) for _ in range(2)]
    sides = [as_entries([ctx[0]], B), as_entries([ctx[1]] if with_negative else [], B)]
    pos, neg = resolve(sides, (B, H, W, C), SD1_MODEL_SAMPLING)

    def unet(x, t, context, extras=None):
        if calls is not None:
            calls.append(x.shape[0])
        return fake_unet_mx(x, t, context, extras)

    return CFGDenoiser(unet, pos, neg, cfg, SD1_MODEL_SAMPLING)


def test_the_capture_evaluates_the_negative_at_cfg_1_as_comfyui():
    sigma = float(SD1_MODEL_SAMPLING.sigmas[500])
    x = mx.array(np.random.default_rng(5).standard_normal((B, H, W, C)).astype(np.float32) * sigma)
    plain_calls, captured_calls = [], []
    denoiser = _cfg_denoiser(1.0, calls=plain_calls)
    plain = denoiser(x, sigma)
    assert sum(plain_calls) == B  # cfg 1: the negative is skipped ...
    denoised, uncond = with_uncond(_cfg_denoiser(1.0, calls=captured_calls))(x, sigma)
    assert sum(captured_calls) == 2 * B  # ... unless a cfg_pp sampler needs its prediction
    np.testing.assert_allclose(np.array(denoised), np.array(plain), atol=1e-6)
    reference = CFGDenoiser(denoiser.unet_fn, denoiser.sides[1], [], 1.0, SD1_MODEL_SAMPLING)(x, sigma)
    np.testing.assert_allclose(np.array(uncond), np.array(reference), atol=1e-6)  # the negative's x0
    assert np.abs(np.array(uncond) - np.array(plain)).mean() > 1e-3


def test_without_a_negative_the_uncond_is_zero_as_comfyui():
    sigma = float(SD1_MODEL_SAMPLING.sigmas[500])
    x = mx.array(np.random.default_rng(6).standard_normal((B, H, W, C)).astype(np.float32))
    denoised, uncond = with_uncond(_cfg_denoiser(1.0, with_negative=False))(x, sigma)
    assert not np.array(uncond).any()  # ComfyUI's skipped side sums to 0 / 1e-37


def test_cfg_pp_sampler_runs_through_cfg_denoiser_and_leaves_it_unpatched():
    denoiser = _cfg_denoiser(2.5)
    sigmas = ksampler_sigmas(SD1_MODEL_SAMPLING, "karras", 3, 1.0, "euler_ancestral_cfg_pp")
    x = mx.array(np.random.default_rng(7).standard_normal((B, H, W, C)).astype(np.float32) * sigmas[0])
    out = np.array(get_sampler("euler_ancestral_cfg_pp")(denoiser, x, sigmas, seed=3))
    assert np.isfinite(out).all() and not math.isclose(float(np.abs(out).mean()), 0.0)
    assert denoiser.patches is NO_PATCHES  # the capture went on a copy


def test_cfg_pp_names_follow_comfyui_order():
    for name in COMFY:
        assert name in SAMPLERS
        assert SAMPLERS.index(name.removesuffix("_cfg_pp")) + 1 == SAMPLERS.index(name)
