"""Prediction types, zero-terminal SNR and TCD against diffusers' schedulers on a fake UNet.

The fake UNet is the same smooth function in MLX and torch, so the whole sampling loop (sigma table, input
scaling, the prediction type's denoised formula, CFG, the sampler's update) is compared step for step with
diffusers' EulerDiscreteScheduler (prediction_type="v_prediction", rescale_betas_zero_snr=True) and
TCDScheduler. LCM's boundary conditions are checked against a torch transcription of ComfyUI's ``LCM``
class and ``ModelSamplingDiscreteDistilled``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, TCDScheduler

from sd.sampling.ksampler import prepare_noise, sample
from sd.sampling.model_sampling import ModelSamplingDiscrete, model_sampling_for
from sd.sampling.schedulers import ksampler_sigmas
from sd.sampling.tcd import sample_tcd

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
WEIGHT = np.array([0.9, -0.7, 0.5, 1.1], np.float32)


def fake_unet_mx(x, t, context):
    """NHWC in, NHWC out; depends on the input, the timestep and the conditioning."""
    scale = 1.0 + t.reshape(-1, 1, 1, 1) / 2000.0
    return mx.tanh(x * mx.array(WEIGHT) * scale) + 0.1 * context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)


def fake_unet_torch(x, t, context):
    """The same function on NCHW torch tensors."""
    scale = 1.0 + torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 2000.0
    w = torch.from_numpy(WEIGHT).reshape(1, 4, 1, 1)
    return torch.tanh(x * w * scale) + 0.1 * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_zsnr_table_equals_diffusers_rescaled_betas():
    ours = ModelSamplingDiscrete(zsnr=True)
    ref = EulerDiscreteScheduler(**SD15, rescale_betas_zero_snr=True)
    ref_sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt().numpy()
    # diffusers pins the last alpha_bar at 2**-24, ComfyUI (and we) at 4.897e-8: compare the rest
    np.testing.assert_allclose(ours.sigmas[:-1], ref_sigmas[:-1], rtol=2e-4)
    assert math.isclose(ours.sigma_max, math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08),
                        rel_tol=1e-6)
    plain = ModelSamplingDiscrete()
    assert plain.sigma_max < 15 and ours.sigma_max > 4000  # the rescale really moved the end


@pytest.mark.parametrize("zsnr", [False, True])
def test_v_prediction_sampling_equals_diffusers_euler(zsnr):
    ms = model_sampling_for("v_prediction", zsnr)
    shape, cfg, seed, steps = (1, 6, 6, 4), 5.0, 3, 6
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 77, 8)).astype(np.float32)
    neg = rng.standard_normal((1, 77, 8)).astype(np.float32)
    ours = sample(fake_unet_mx, mx.array(pos), mx.array(neg), mx.zeros(shape), seed=seed, steps=steps,
                  cfg=cfg, sampler_name="euler", scheduler="karras", model_sampling=ms)

    sigmas = ksampler_sigmas(ms, "karras", steps, 1.0, "euler")
    ref = EulerDiscreteScheduler(**SD15, prediction_type="v_prediction", rescale_betas_zero_snr=zsnr)
    ref.set_timesteps(sigmas=sigmas.tolist())
    np.testing.assert_allclose(ref.sigmas.numpy(), sigmas, rtol=1e-6)
    x = torch.from_numpy(np.array(prepare_noise(seed, shape))).permute(0, 3, 1, 2)
    x = x * math.sqrt(1 + float(sigmas[0]) ** 2)  # ComfyUI's start at full denoise
    context = torch.from_numpy(np.concatenate([pos, neg]))
    for t in ref.timesteps:
        sigma = float(ref.sigmas[ref.step_index or 0])
        x_in = ref.scale_model_input(x, t)
        # our UNet sees the table's integer timestep; feed the same one to the reference
        timestep = float(ms.timestep(np.float32(sigma)))
        out = fake_unet_torch(torch.cat([x_in, x_in]), torch.full((2,), timestep), context)
        v = out[1:] + (out[:1] - out[1:]) * cfg  # CFG is linear, so on v it equals CFG on x0
        x = ref.step(v, t, x).prev_sample
    expected = (x / 0.18215).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(ours), expected, rtol=2e-4, atol=2e-4)


def test_x0_prediction_is_the_output():
    ms = model_sampling_for("x0")
    out, x = mx.ones((1, 2, 2, 4)) * 0.25, mx.ones((1, 2, 2, 4)) * 7
    assert np.allclose(np.array(ms.calculate_denoised(mx.array([3.0]), out, x)), 0.25)


def comfy_lcm_denoised(sigma, model_output, model_input, log_sigmas_distilled):
    """ComfyUI's LCM.calculate_denoised over ModelSamplingDiscreteDistilled.timestep, transcribed."""
    dists = sigma.log() - log_sigmas_distilled[:, None]
    timestep = (dists.abs().argmin(dim=0) * 20 + 19).view(-1, 1, 1, 1).float()
    sigma = sigma.view(-1, 1, 1, 1)
    x0 = model_input - model_output * sigma
    scaled = timestep * 10.0
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    return c_out * x0 + c_skip * model_input


@pytest.mark.parametrize("zsnr", [False, True])
def test_lcm_matches_comfyui_distilled_sampling(zsnr):
    ms = model_sampling_for("lcm", zsnr)
    full = ModelSamplingDiscrete(zsnr=zsnr)
    distilled = torch.zeros(50)
    for x in range(50):  # ModelSamplingDiscreteDistilled.__init__
        distilled[49 - x] = float(full.sigmas[999 - x * 20])
    np.testing.assert_array_equal(ms.sigmas, distilled.numpy())
    assert int(ms.timestep(np.float32(ms.sigma_max))) == 999 and int(ms.timestep(ms.sigma_min)) == 19
    assert math.isclose(float(ms.sigma(np.float32(999))), ms.sigma_max, rel_tol=1e-6)
    rng = np.random.default_rng(1)
    out = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    x = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    sigma = np.array([ms.sigmas[-1], ms.sigmas[20], 0.5], np.float32)
    ours = ms.calculate_denoised(mx.array(sigma), mx.array(out), mx.array(x))
    ref = comfy_lcm_denoised(torch.from_numpy(sigma), torch.from_numpy(out), torch.from_numpy(x),
                             distilled.log())
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=1e-5, atol=1e-6)
    # the boundary-condition terms are small at t >= 19: compare them on their own scale
    x0 = x - out * sigma.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(np.array(ours) - x0, ref.numpy() - x0, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_equals_diffusers_tcd_scheduler(eta, monkeypatch):
    ms = model_sampling_for()
    timesteps = [999, 759, 499, 259]
    sigmas = [float(ms.sigmas[t]) for t in timesteps] + [0.0]
    rng = np.random.default_rng(2)
    shape = (1, 4, 5, 5)  # NCHW for the reference
    start = rng.standard_normal(shape).astype(np.float32)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in timesteps]
    context = torch.from_numpy(rng.standard_normal((1, 77, 8)).astype(np.float32))

    def denoise(x, sigma):  # eps model in ComfyUI's scaling, as the CFG denoiser calls it
        t = float(ms.timestep(np.float32(sigma)))
        x_in = x / math.sqrt(sigma**2 + 1)
        return x - fake_unet_mx(x_in, mx.array([t]), mx.array(context.numpy())) * sigma

    drawn = iter(noises)

    def noise_sampler(sigma, sigma_next):
        return mx.array(next(drawn).transpose(0, 2, 3, 1))

    x_ours = mx.array(start.transpose(0, 2, 3, 1)) * math.sqrt(1 + sigmas[0] ** 2)
    ours = sample_tcd(denoise, x_ours, sigmas, noise_sampler=noise_sampler, eta=eta, model_sampling=ms)

    ref = TCDScheduler(**SD15)
    ref.set_timesteps(timesteps=timesteps)
    ref_noise = iter(noises)
    monkeypatch.setattr("diffusers.schedulers.scheduling_tcd.randn_tensor",
                        lambda *a, **k: torch.from_numpy(next(ref_noise)))
    x = torch.from_numpy(start)  # VP space: x_T ~ N(0, 1)
    for t in ref.timesteps:
        eps = fake_unet_torch(x, torch.tensor([float(t)]), context)
        x = ref.step(eps, t, x, eta=eta).prev_sample
    np.testing.assert_allclose(np.array(ours), x.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
