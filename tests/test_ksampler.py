"""KSampler semantics with a fake UNet that records its calls.

Expected values are derived here by hand from ComfyUI's rules (sigma table in float64 via torch,
initial noise from torch.randn), not from sd/ itself.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.errors import Cancelled
from sd.sampling.ksampler import SAMPLERS, SCHEDULERS, sample

SCALE = 0.18215


def sigma_table():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return (((1 - ac) / ac) ** 0.5).float().numpy()


SIGMAS = sigma_table()
SIGMA_MAX = float(SIGMAS[-1])


class RecordingUNet:
    """eps = mean of each row's context (a constant per image), so CFG is easy to predict."""

    def __init__(self, zero=False):
        self.calls = []
        self.zero = zero

    def __call__(self, x, t, context):
        self.calls.append((np.array(x), np.array(t), np.array(context)))
        if self.zero:
            return mx.zeros_like(x)
        return mx.broadcast_to(mx.mean(context, axis=(1, 2)).reshape(-1, 1, 1, 1), x.shape)


def cond(value, length=77, dim=8):
    return mx.full((1, length, dim), value, dtype=mx.float32)


def run(unet, latent=None, **kw):
    latent = mx.zeros((1, 8, 8, 4)) if latent is None else latent
    args = dict(seed=42, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal")
    args.update(kw)
    positive = args.pop("positive", [cond(1.0)])
    negative = args.pop("negative", [cond(-1.0)])
    return sample(unet, positive, negative, latent, **args)


def torch_noise_nhwc(seed, shape_nchw):
    torch.manual_seed(seed)
    return torch.randn(shape_nchw).numpy().transpose(0, 2, 3, 1)


def test_names_for_nodes():
    assert (
        SAMPLERS[:5] == ("euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun")
        and "uni_pc" in SAMPLERS and "ddim" in SAMPLERS
    )
    assert SCHEDULERS == ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                          "linear_quadratic", "kl_optimal")


@pytest.mark.parametrize("batch", [1, 3])
def test_one_unet_call_per_step_with_cond_and_uncond_batched(batch):
    unet = RecordingUNet()
    run(unet, latent=mx.zeros((batch, 8, 8, 4)), steps=5)
    assert len(unet.calls) == 5
    for x, t, ctx in unet.calls:
        assert x.shape == (2 * batch, 8, 8, 4) and t.shape == (2 * batch,) and ctx.shape == (2 * batch, 77, 8)
    # Timesteps are integers, the same for the whole batch, the normal schedule's 999, 749, 500, 250, 0 ...
    assert [float(t[0]) for _, t, _ in unet.calls] == [999.0, 749.0, 500.0, 250.0, 0.0]


def test_cfg_one_skips_uncond():
    unet = RecordingUNet()
    run(unet, cfg=1.0)
    assert len(unet.calls) == 4 and all(x.shape[0] == 1 for x, _, _ in unet.calls)
    assert all(np.all(ctx == 1.0) for _, _, ctx in unet.calls)


def test_cfg_combines_denoised_predictions():
    # One Euler step from sigma_max to 0 returns the CFG-combined x0 prediction.
    unet = RecordingUNet()
    out = np.array(run(unet, steps=1, cfg=7.5, positive=[cond(0.5)], negative=[cond(-0.25)]))
    x0 = torch_noise_nhwc(42, (1, 4, 8, 8)) * math.sqrt(1 + SIGMA_MAX**2)
    eps = -0.25 + (0.5 - -0.25) * 7.5
    np.testing.assert_allclose(out, (x0 - SIGMA_MAX * eps) / SCALE, rtol=1e-5, atol=1e-4)
    # The UNet saw x / sqrt(sigma^2 + 1).
    np.testing.assert_allclose(unet.calls[0][0][0], x0[0] / math.sqrt(SIGMA_MAX**2 + 1), rtol=1e-5, atol=1e-6)


def test_several_conditionings_are_averaged():
    unet = RecordingUNet()
    out = np.array(run(unet, steps=1, cfg=1.0, positive=[cond(0.2), cond(0.6)]))
    x0 = torch_noise_nhwc(42, (1, 4, 8, 8)) * math.sqrt(1 + SIGMA_MAX**2)
    np.testing.assert_allclose(out, (x0 - SIGMA_MAX * 0.4) / SCALE, rtol=1e-5, atol=1e-4)
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == 2


def test_initial_noise_is_comfyui_prepare_noise_for_a_batch():
    # eps = 0 keeps x constant, so the output is the scaled initial noise of the whole batch.
    out = np.array(run(RecordingUNet(zero=True), latent=mx.zeros((2, 5, 7, 4)), seed=2**32 + 3))
    expected = torch_noise_nhwc(2**32 + 3, (2, 4, 5, 7)) * math.sqrt(1 + SIGMA_MAX**2) / SCALE
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_denoise_zero_returns_input_unchanged():
    unet = RecordingUNet()
    latent = mx.array(np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32))
    out = run(unet, latent=latent, denoise=0.0)
    assert not unet.calls
    np.testing.assert_array_equal(np.array(out), np.array(latent))


def test_denoise_tail_rule_and_latent_scale():
    # denoise 0.5, 4 steps: the last 5 sigmas of the 8-step normal schedule, timesteps
    # 999 * (3, 2, 1, 0) / 7 rounded to the nearest table entry.
    unet = RecordingUNet(zero=True)
    latent = mx.full((1, 8, 8, 4), 2.0)
    out = run(unet, latent=latent, denoise=0.5, add_noise=False)
    assert [float(t[0]) for _, t, _ in unet.calls] == [428.0, 285.0, 143.0, 0.0]
    # Scale applied once on the way in (the UNet sees 2 * 0.18215 / sqrt(sigma^2 + 1)) and undone once.
    sigma0 = math.exp((1 - 0.142857) * math.log(SIGMAS[428]) + 0.142857 * math.log(SIGMAS[429]))
    np.testing.assert_allclose(unet.calls[0][0], 2.0 * SCALE / math.sqrt(sigma0**2 + 1), rtol=1e-4)
    np.testing.assert_allclose(np.array(out), 2.0, rtol=1e-6)


def test_partial_denoise_adds_noise_times_sigma():
    unet = RecordingUNet(zero=True)
    latent = mx.full((1, 8, 8, 4), 1.5)
    out = np.array(run(unet, latent=latent, steps=10, denoise=0.5, seed=7))
    # 20-step normal schedule (timesteps 999 * k / 19), keep the last 11 sigmas: start at 999 * 9 / 19.
    t0 = 999 * 9 / 19
    lo = math.floor(t0)
    w = t0 - lo
    sigma0 = math.exp((1 - w) * math.log(SIGMAS[lo]) + w * math.log(SIGMAS[lo + 1]))
    expected = (1.5 * SCALE + sigma0 * torch_noise_nhwc(7, (1, 4, 8, 8))) / SCALE
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_advanced_start_and_end_steps():
    unet = RecordingUNet(zero=True)
    run(unet, steps=10, start_step=3, last_step=6)
    # 10-step normal schedule: timesteps 999 - 111 k; steps 3, 4, 5 run.
    assert [float(t[0]) for _, t, _ in unet.calls] == [666.0, 555.0, 444.0]


def test_leftover_noise_vs_full_denoise():
    latent = mx.zeros((1, 8, 8, 4))
    full = np.array(run(RecordingUNet(), latent=latent, steps=10, last_step=5, force_full_denoise=True))
    leftover = np.array(run(RecordingUNet(), latent=latent, steps=10, last_step=5, force_full_denoise=False))
    assert not np.allclose(full, leftover)
    # Leftover noise: x at sigma(999 - 555) still carries noise of that size.
    assert leftover.std() * SCALE > 1.0


def test_start_step_past_the_end_returns_input():
    unet = RecordingUNet()
    latent = mx.full((1, 8, 8, 4), 0.25)
    out = run(unet, latent=latent, steps=10, start_step=10)
    assert not unet.calls
    np.testing.assert_array_equal(np.array(out), np.array(latent))


def test_different_length_conds_batched_by_repetition():
    unet = RecordingUNet()
    pos = mx.concatenate([cond(1.0, 77), cond(3.0, 77)], axis=1)  # two chunks, 154 tokens
    run(unet, steps=2, positive=[pos], negative=[cond(-1.0, 77)])
    assert len(unet.calls) == 2
    ctx = unet.calls[0][2]
    assert ctx.shape == (2, 154, 8)
    np.testing.assert_array_equal(ctx[1, :77], ctx[1, 77:])  # the short one repeated, not zero-padded


def test_lengths_too_far_apart_get_separate_calls():
    unet = RecordingUNet()
    run(unet, steps=2, positive=[cond(1.0, 77 * 5)], negative=[cond(-1.0, 77)])
    assert len(unet.calls) == 4
    assert sorted(c[2].shape[1] for c in unet.calls[:2]) == [77, 385]


def test_callback_per_step_and_cancel():
    seen = []
    run(
        RecordingUNet(),
        steps=6,
        sampler_name="heun",
        callback=lambda i, n, x, d: seen.append((i, n, x.shape)),
    )
    assert seen == [(i, 6, (1, 8, 8, 4)) for i in range(6)]

    unet = RecordingUNet()
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(Cancelled):
        run(unet, steps=6, cancel=cancel)
    assert len(unet.calls) == 2


def test_same_seed_same_result_different_seed_different():
    a = np.array(run(RecordingUNet(), seed=1, sampler_name="euler_ancestral"))
    b = np.array(run(RecordingUNet(), seed=1, sampler_name="euler_ancestral"))
    c = np.array(run(RecordingUNet(), seed=2, sampler_name="euler_ancestral"))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_through_ksampler(name):
    unet = RecordingUNet()
    out = np.array(run(unet, sampler_name=name, steps=3, scheduler="karras"))
    assert out.shape == (1, 8, 8, 4) and np.isfinite(out).all()
    assert unet.calls and all(c[0].shape[0] == 2 for c in unet.calls)


# --- End to end with a small random-weight UNet (SD1.5's structure at toy widths) ---------------


@pytest.fixture(scope="module")
def tiny_unet():
    from sd.models.unet import UNetModel
    from sd.synthetic.unet import TINY_UNET

    mx.random.seed(0)
    model = UNetModel(TINY_UNET)
    mx.eval(model.parameters())
    return model


def _tiny_context(value):
    return mx.array(np.random.default_rng(value).standard_normal((1, 77, 64)).astype(np.float32))


def _tiny_run(unet, latent, **kw):
    args = dict(seed=99, steps=4, cfg=5.0, sampler_name="euler", scheduler="karras")
    args.update(kw)
    return np.array(sample(unet, [_tiny_context(1)], [_tiny_context(2)], latent, **args))


@pytest.mark.slow
def test_end_to_end_same_seed_same_latent(tiny_unet):
    latent = mx.zeros((1, 16, 16, 4))
    a = _tiny_run(tiny_unet, latent)
    b = _tiny_run(tiny_unet, latent)
    c = _tiny_run(tiny_unet, latent, seed=100)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.slow
def test_end_to_end_img2img_half_denoise_stays_closer_to_the_input(tiny_unet):
    latent = mx.array(np.random.default_rng(3).standard_normal((1, 16, 16, 4)).astype(np.float32))
    half = _tiny_run(tiny_unet, latent, denoise=0.5)
    full = _tiny_run(tiny_unet, latent, denoise=1.0)
    source = np.array(latent)
    assert not np.allclose(half, source)
    assert np.linalg.norm(half - source) < np.linalg.norm(full - source)
