"""Guiders and guidance patches against a torch transcription of ComfyUI's formulas: DualCFGGuider,
PerpNegGuider (comfy_extras/nodes_custom_sampler.py, nodes_perpneg.py), RescaleCFG (nodes_model_advanced.py),
FreeU_V2 (nodes_freelunch.py), PerturbedAttentionGuidance (nodes_pag.py) on the fake UNet, and SAG's blur
map (nodes_sag.py); then each patch on a real tiny UNet through the KSampler node."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from comfy_conds_reference import B, C, D, H, L, W, comfy_calc_cond_batch, comfy_process, fake_unet_mx

from sd.models.unet_extras import Site
from sd.sampling.conds import as_entries, resolve
from sd.sampling.guidance import CFGDenoiser, DualCFGDenoiser, PerpNegDenoiser
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING as MS
from sd.sampling.patches import (
    create_blur_map,
    freeu_v2_patches,
    gaussian_blur_2d,
    pag_patches,
    rescale_cfg_patches,
)


def _sides(rng, n, with_area=True):
    """n sides of entries as (torch dicts, our pairs); the first side gets an extra area entry."""
    torch_sides, our_sides = [], []
    for k in range(n):
        entries = [{}] + ([{"area": (16, 24, 8, 16), "strength": 0.8}] if with_area and k == 0 else [])
        ctxs = [rng.standard_normal((1, L, D)).astype(np.float32) for _ in entries]
        torch_sides.append([dict(e, cross_attn=torch.from_numpy(np.repeat(c, B, axis=0)))
                            for e, c in zip(entries, ctxs, strict=True)])
        our_sides.append(as_entries([(mx.array(c), e) for e, c in zip(entries, ctxs, strict=True)], B))
    return torch_sides, our_sides


def _x(rng, sigma):
    x = rng.standard_normal((B, C, H, W)).astype(np.float32) * sigma
    return torch.from_numpy(x), mx.array(x.transpose(0, 2, 3, 1))


def _nchw(a):
    return np.array(a).transpose(0, 3, 1, 2)


SIGMAS = [float(MS.sigmas[i]) for i in (900, 300, 20)]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_dual_cfg_matches_comfyui(sigma):
    rng = np.random.default_rng(1)
    (t_c1, t_c2, t_neg), (c1, c2, neg) = _sides(rng, 3)
    xt, xm = _x(rng, sigma)
    pos_t, mid_t, neg_t = comfy_process([t_c1, t_c2, t_neg])  # ComfyUI's order: positive, middle, negative
    out = comfy_calc_cond_batch([neg_t, mid_t, pos_t], xt, sigma)
    want = (out[0] + (out[1] - out[0]) * 3.0) + (out[2] - out[1]) * 5.5
    r1, r2, rn = resolve([c1, c2, neg], (B, H, W, C), MS)
    got = DualCFGDenoiser(fake_unet_mx, r1, r2, rn, 5.5, 3.0, MS)(xm, sigma)
    np.testing.assert_allclose(_nchw(got), want.numpy(), rtol=3e-5, atol=3e-5 * sigma)


def comfy_perp_neg(noise_pred_pos, noise_pred_neg, noise_pred_nocond, neg_scale, cond_scale):
    pos = noise_pred_pos - noise_pred_nocond
    neg = noise_pred_neg - noise_pred_nocond
    perp = neg - ((torch.mul(neg, pos).sum()) / (torch.norm(pos) ** 2)) * pos
    return noise_pred_nocond + cond_scale * (pos - perp * neg_scale)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_perp_neg_matches_comfyui(sigma):
    rng = np.random.default_rng(2)
    (t_pos, t_neg, t_empty), (pos, neg, empty) = _sides(rng, 3)
    xt, xm = _x(rng, sigma)
    p_t, e_t, n_t = comfy_process([t_pos, t_empty, t_neg])
    out = comfy_calc_cond_batch([p_t, n_t, e_t], xt, sigma)
    want = comfy_perp_neg(*out, 1.3, 6.0)
    rp, re, rn = resolve([pos, empty, neg], (B, H, W, C), MS)
    got = PerpNegDenoiser(fake_unet_mx, rp, rn, re, 6.0, 1.3, MS)(xm, sigma)
    np.testing.assert_allclose(_nchw(got), want.numpy(), rtol=3e-5, atol=3e-5 * sigma)


def comfy_rescale_cfg(args, multiplier):
    cond, uncond, cond_scale = args["cond"], args["uncond"], args["cond_scale"]
    sigma = args["sigma"].view(args["sigma"].shape[:1] + (1,) * (cond.ndim - 1))
    x_orig = args["input"]
    x = x_orig / (sigma * sigma + 1.0)
    cond = ((x - (x_orig - cond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
    uncond = ((x - (x_orig - uncond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
    x_cfg = uncond + cond_scale * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_rescaled = x_cfg * (ro_pos / ro_cfg)
    x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
    return x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_rescale_cfg_matches_comfyui(sigma, cfg):
    rng = np.random.default_rng(3)
    (t_pos, t_neg), (pos, neg) = _sides(rng, 2)
    xt, xm = _x(rng, sigma)
    p_t, n_t = comfy_process([t_pos, t_neg])
    cond, uncond = comfy_calc_cond_batch([p_t, None if math.isclose(cfg, 1.0) else n_t], xt, sigma)
    args = {"cond": xt - cond, "uncond": xt - uncond, "cond_scale": cfg, "sigma": torch.full((B,), sigma),
            "input": xt}
    want = xt - comfy_rescale_cfg(args, 0.7)
    rp, rn = resolve([pos, neg], (B, H, W, C), MS)
    got = CFGDenoiser(fake_unet_mx, rp, rn, cfg, MS, rescale_cfg_patches(0.7))(xm, sigma)
    np.testing.assert_allclose(_nchw(got), want.numpy(), rtol=1e-4, atol=1e-4 * sigma)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_pag_matches_comfyui(sigma):
    rng = np.random.default_rng(4)
    (t_pos, t_neg), (pos, neg) = _sides(rng, 2)
    xt, xm = _x(rng, sigma)
    p_t, n_t = comfy_process([t_pos, t_neg])
    cond, uncond = comfy_calc_cond_batch([p_t, n_t], xt, sigma)
    (pag,) = comfy_calc_cond_batch([p_t], xt, sigma, perturbed=True)
    want = (uncond + (cond - uncond) * 6.0) + (cond - pag) * 2.5
    rp, rn = resolve([pos, neg], (B, H, W, C), MS)
    got = CFGDenoiser(fake_unet_mx, rp, rn, 6.0, MS, pag_patches(2.5))(xm, sigma)
    np.testing.assert_allclose(_nchw(got), want.numpy(), rtol=3e-5, atol=3e-5 * sigma)


# --- FreeU_V2's block patch ---

def comfy_fourier_filter(x, threshold, scale):
    x_freq = torch.fft.fftn(x.float(), dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))
    b, c, h, w = x_freq.shape
    mask = torch.ones((b, c, h, w))
    crow, ccol = h // 2, w // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    x_freq = x_freq * mask
    x_freq = torch.fft.ifftshift(x_freq, dim=(-2, -1))
    return torch.fft.ifftn(x_freq, dim=(-2, -1)).real.to(x.dtype)


def comfy_freeu_v2(h, hsp, model_channels, b1, b2, s1, s2):
    scale = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}.get(int(h.shape[1]))
    if scale is not None:
        hidden_mean = h.mean(1).unsqueeze(1)
        b = hidden_mean.shape[0]
        hidden_max, _ = torch.max(hidden_mean.view(b, -1), dim=-1, keepdim=True)
        hidden_min, _ = torch.min(hidden_mean.view(b, -1), dim=-1, keepdim=True)
        hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (
            hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
        h = h.clone()
        h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((scale[0] - 1) * hidden_mean + 1)
        hsp = comfy_fourier_filter(hsp, threshold=1, scale=scale[1])
    return h, hsp


@pytest.mark.parametrize("channels, hw", [(128, (4, 6)), (64, (8, 5)), (32, (16, 16)), (128, (1, 1))])
def test_freeu_v2_block_patch_matches_comfyui(channels, hw):
    rng = np.random.default_rng(5)
    h = rng.standard_normal((2, channels, *hw)).astype(np.float32)
    hsp = rng.standard_normal((2, channels // 2, *hw)).astype(np.float32)
    (patch,) = freeu_v2_patches(32, 1.3, 1.4, 0.9, 0.2).unet_extras.output_block_patch
    want_h, want_s = comfy_freeu_v2(torch.from_numpy(h), torch.from_numpy(hsp), 32, 1.3, 1.4, 0.9, 0.2)
    nhwc = lambda a: mx.array(a.transpose(0, 2, 3, 1))  # noqa: E731
    got_h, got_s = patch(nhwc(h), nhwc(hsp), Site("output", 3))
    if hw != (1, 1):  # a 1x1 map normalises 0/0 in both
        np.testing.assert_allclose(_nchw(got_h), want_h.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_nchw(got_s), want_s.numpy(), rtol=1e-4, atol=1e-5)


# --- SAG's blur map ---

def comfy_gaussian_blur_2d(img, kernel_size, sigma):
    ksize_half = (kernel_size - 1) * 0.5
    x = torch.linspace(-ksize_half, ksize_half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    x_kernel = pdf / pdf.sum()
    kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :])
    kernel2d = kernel2d.expand(img.shape[-3], 1, kernel2d.shape[0], kernel2d.shape[1])
    padding = [kernel_size // 2, kernel_size // 2, kernel_size // 2, kernel_size // 2]
    img = F.pad(img, padding, mode="reflect")
    return F.conv2d(img, kernel2d, groups=img.shape[-3])


def comfy_create_blur_map(x0, attn, sigma=3.0, threshold=1.0):
    _, hw1, hw2 = attn.shape
    b, _, lh, lw = x0.shape
    attn = attn.reshape(b, -1, hw1, hw2)
    mask = attn.mean(1, keepdim=False).sum(1, keepdim=False) > threshold
    total = mask.shape[-1]
    x = round(math.sqrt((lh / lw) * total))
    xx = None
    for i in range(0, math.floor(math.sqrt(total) / 2)):
        for j in [(x + i), max(1, x - i)]:
            if total % j == 0:
                xx = j
                break
        if xx is not None:
            break
    x = xx
    y = total // x
    mask = mask.reshape(b, x, y).unsqueeze(1).type(attn.dtype)
    mask = F.interpolate(mask, (lh, lw))
    blurred = comfy_gaussian_blur_2d(x0, kernel_size=9, sigma=sigma)
    return blurred * mask + x0 * (1 - mask)


@pytest.mark.parametrize("lh, lw, mh, mw", [(48, 64, 6, 8), (40, 24, 5, 3), (16, 16, 2, 2)])
def test_sag_blur_map_matches_comfyui(lh, lw, mh, mw):
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((2, 4, lh, lw)).astype(np.float32)
    heads, n = 8, mh * mw
    logits = rng.standard_normal((2 * heads, n, n)).astype(np.float32) * 3
    scores = torch.softmax(torch.from_numpy(logits), dim=-1)
    want = comfy_create_blur_map(torch.from_numpy(x0), scores, sigma=2.0)
    ours_scores = mx.array(scores.numpy().reshape(2, heads, n, n))
    got = create_blur_map(mx.array(x0.transpose(0, 2, 3, 1)), ours_scores, 2.0)
    np.testing.assert_allclose(_nchw(got), want.numpy(), rtol=1e-5, atol=1e-5)
    blur = gaussian_blur_2d(mx.array(x0.transpose(0, 2, 3, 1)), 9, 1.5)
    np.testing.assert_allclose(_nchw(blur), comfy_gaussian_blur_2d(torch.from_numpy(x0), 9, 1.5).numpy(),
                               rtol=1e-5, atol=1e-6)


# --- each patch through the KSampler node on a real tiny UNet ---

class Ctx:
    def log(self, msg: str) -> None:
        pass

    def progress(self, step: int, total: int) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from sd_nodes_testing import make_world

    from nodes.conditioning import CLIPEncode
    from nodes.values import ClipRecipe, FileRef, Latent, ModelRecipe

    world = make_world(tmp_path_factory, tmp_path_factory.mktemp("guidance"))
    ref = FileRef.of(world.checkpoint)
    ctx = Ctx()
    clip = ClipRecipe(ref)
    pos, neg = CLIPEncode(clip, "a red fox", ctx=ctx), CLIPEncode(clip, "blurry", ctx=ctx)
    latent = Latent(mx.zeros((1, 16, 16, 4)))

    def run(model):
        from nodes.sampling import KSampler

        return np.array(KSampler(model, seed=3, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                                 positive=pos, negative=neg, latent_image=latent, ctx=ctx).samples)

    return ModelRecipe(ref), run


@pytest.mark.slow
def test_every_patch_changes_the_image_and_stays_finite(tiny_run):
    from nodes.model_patches import (
        FreeU_V2,
        PerturbedAttentionGuidance,
        RescaleCFG,
        SelfAttentionGuidance,
    )

    model, run = tiny_run
    plain = run(model)
    for patched in (RescaleCFG(model, 0.7), FreeU_V2(model), SelfAttentionGuidance(model, 0.8, 2.0),
                    PerturbedAttentionGuidance(RescaleCFG(model, 0.5), 3.0)):
        out = run(patched)
        assert np.isfinite(out).all() and not np.array_equal(out, plain), patched.sampling_patches
    assert model.sampling_patches == () and len(RescaleCFG(FreeU_V2(model)).sampling_patches) == 2
    assert RescaleCFG(model, 0.0) is model  # plain CFG: no patch


def test_sag_records_the_negative_middle_attention(tiny_run):
    from sd.sampling.patches import _AttentionRecorder

    recorder = _AttentionRecorder()
    assert recorder.extras_for((0,)).is_empty  # a call without the negative: plain attention
    extras = recorder.extras_for((0, 1))
    (attend,) = extras.attn1_replace.values()
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((4, 6, 16)).astype(np.float32)) for _ in range(3))
    out = attend(q, k, v, 2, 0.25)
    from sd.models.ops import PLAIN

    want = PLAIN.attention(q, k, v, 2, 0.25)
    np.testing.assert_allclose(np.array(out), np.array(want), rtol=1e-5, atol=1e-6)
    assert recorder.scores.shape == (2, 2, 6, 6)  # the second half of the batch: the negative's chunk
    np.testing.assert_allclose(np.array(recorder.scores.sum(axis=-1)), 1.0, rtol=1e-5)
