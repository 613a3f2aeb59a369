"""The noise mask while sampling, against a torch transcription of ComfyUI's code written here: KSampler's
loop (noise_scaling, Euler, CFG on the denoised prediction) with `KSamplerX0Inpaint` around the model, the
mask resized by `prepare_mask`, and `DifferentialDiffusion`'s per-step threshold mask; on a fake UNet."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sd.sampling.inpaint import differential_diffusion
from sd.sampling.ksampler import prepare_noise, sample, select_sigmas
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING

SCALE = 0.18215
MS = SD1_MODEL_SAMPLING


def fake_unet(x, t, context, extras=None):
    """eps that depends on x, the timestep and the prompt, so CFG and the blend are all visible."""
    prompt = context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
    return 0.3 * x + 0.2 * mx.sin(x) + (t / 1000.0).reshape(-1, 1, 1, 1) + prompt


def torch_fake_unet(x, t, context):
    prompt = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return 0.3 * x + 0.2 * torch.sin(x) + (t / 1000.0).reshape(-1, 1, 1, 1) + prompt


# --- torch transcription of ComfyUI (NCHW) ----------------------------------------------------------

LOG_SIGMAS = torch.from_numpy(np.log(MS.sigmas.astype(np.float32)))


def timestep(sigma):  # ModelSamplingDiscrete.timestep
    dists = torch.log(sigma) - LOG_SIGMAS[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape)


def cfg_model(x, sigma, cond, uncond, cfg):
    s = sigma.reshape(-1, 1, 1, 1)
    x_in = x / (s**2 + 1.0) ** 0.5
    t = timestep(sigma).float()
    out_c = x - torch_fake_unet(x_in, t, cond) * s
    out_u = x - torch_fake_unet(x_in, t, uncond) * s
    return out_u + (out_c - out_u) * cfg


def prepare_mask(noise_mask, shape):  # comfy.sampler_helpers.prepare_mask -> comfy.utils.reshape_mask
    m = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]))
    m = F.interpolate(m, size=shape[2:], mode="bilinear")
    m = m.repeat((1, shape[1], 1, 1))[:, : shape[1]]
    if m.shape[0] < shape[0]:
        m = m.repeat((math.ceil(shape[0] / m.shape[0]), 1, 1, 1))[: shape[0]]
    return m[: shape[0]]


def dd_forward(sigma, denoise_mask, step_sigmas, strength):  # nodes_differential_diffusion.py
    sigma_to = torch.tensor(float(MS.sigma_min))
    if step_sigmas[-1] > sigma_to:
        sigma_to = step_sigmas[-1]
    sigma_from = step_sigmas[0]
    ts_from, ts_to = timestep(sigma_from.reshape(1)), timestep(sigma_to.reshape(1))
    current_ts = timestep(sigma[:1])
    threshold = (current_ts - ts_to) / (ts_from - ts_to)
    binary = (denoise_mask >= threshold).to(denoise_mask.dtype)
    if strength and strength < 1:
        return strength * binary + (1 - strength) * denoise_mask
    return binary


def comfy_inpaint_sample(latent, noise, noise_mask, sigmas, cond, uncond, cfg, dd_strength=None):
    latent_image = latent * SCALE  # process_latent_in
    denoise_mask = prepare_mask(noise_mask, noise.shape)
    sigma_max = float(MS.sigma_max)
    max_denoise = math.isclose(sigma_max, float(sigmas[0]), rel_tol=1e-05) or sigmas[0] > sigma_max
    s0 = sigmas[0]
    x = noise * ((1.0 + s0**2) ** 0.5 if max_denoise else s0) + latent_image  # EPS.noise_scaling

    def model_k(x, sigma):  # KSamplerX0Inpaint.__call__
        mask = denoise_mask
        if dd_strength is not None:
            mask = dd_forward(sigma, mask, sigmas, dd_strength)
        latent_mask = 1.0 - mask
        x = x * mask + (latent_image + noise * sigma.reshape(-1, 1, 1, 1)) * latent_mask
        out = cfg_model(x, sigma, cond, uncond, cfg)
        return out * mask + latent_image * latent_mask

    for i in range(len(sigmas) - 1):  # k-diffusion sample_euler, s_churn = 0
        sigma = sigmas[i] * torch.ones(x.shape[0])
        denoised = model_k(x, sigma)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x / SCALE  # process_latent_out


@pytest.mark.parametrize("denoise, dd_strength", [(1.0, None), (0.6, None), (1.0, 1.0), (0.7, 0.5)])
def test_masked_sampling_equals_comfyui(denoise, dd_strength):
    rng = np.random.default_rng(4)
    latent = rng.standard_normal((2, 6, 10, 4)).astype(np.float32)
    mask = np.clip(rng.random((1, 48, 80)) * 1.4 - 0.2, 0, 1).astype(np.float32)  # soft, pixel size
    mask[:, :, :32] = 0.0  # a known region
    cond = rng.standard_normal((1, 77, 8)).astype(np.float32)
    uncond = rng.standard_normal((1, 77, 8)).astype(np.float32) * 0.5
    steps, cfg = 6, 4.0
    ours = sample(fake_unet, mx.array(cond), mx.array(uncond), mx.array(latent), seed=9, steps=steps, cfg=cfg,
                  sampler_name="euler", scheduler="normal", denoise=denoise, denoise_mask=mx.array(mask),
                  mask_function=differential_diffusion(dd_strength) if dd_strength is not None else None)
    sigmas = torch.from_numpy(select_sigmas(MS, "normal", "euler", steps, denoise).astype(np.float32))
    noise = torch.from_numpy(np.array(prepare_noise(9, latent.shape)).transpose(0, 3, 1, 2).copy())
    ref = comfy_inpaint_sample(torch.from_numpy(latent.transpose(0, 3, 1, 2).copy()), noise,
                               torch.from_numpy(mask), sigmas, torch.from_numpy(cond).expand(2, -1, -1),
                               torch.from_numpy(uncond).expand(2, -1, -1), cfg, dd_strength)
    ref = ref.numpy().transpose(0, 2, 3, 1)
    ours = np.array(ours)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # where the mask is 0 at latent size, the input comes back exactly at the last step (sigma 0); not with
    # DifferentialDiffusion, whose threshold reaches 0 at the last model call (at sigma_min): there, as in
    # ComfyUI, every value of the mask passes it and the whole latent takes the model's last prediction
    keep = prepare_mask(torch.from_numpy(mask), (2, 4, 6, 10)).numpy().transpose(0, 2, 3, 1) == 0
    assert keep.any()
    if dd_strength is None:
        np.testing.assert_allclose(ours[keep], latent[keep], atol=1e-5)
    unmasked = sample(fake_unet, mx.array(cond), mx.array(uncond), mx.array(latent), seed=9, steps=steps,
                      cfg=cfg, sampler_name="euler", scheduler="normal", denoise=denoise)
    assert np.abs(np.array(unmasked) - ref).max() > 1e-2  # the mask changes the result
