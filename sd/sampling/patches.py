"""Guidance patches that are maths, not weights: ComfyUI's RescaleCFG, FreeU_V2, PerturbedAttentionGuidance
and SelfAttentionGuidance as `SamplingPatches` (sd/sampling/guidance.py) over the UNet seam
(sd/models/unet_extras.py).

Each `*_patches(...)` builds the patches for one sampling run: SAG keeps the attention map it recorded in
the previous UNet call, which is state of that run only.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from sd.models.ops import merge_heads, split_heads
from sd.models.unet_extras import Site, UNetExtras
from sd.sampling.guidance import CfgArgs, PostCfgArgs, SamplingPatches

# --- RescaleCFG (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed") ---

def rescale_cfg_patches(multiplier: float) -> SamplingPatches:
    """ComfyUI's RescaleCFG: CFG done in v-prediction space, its std rescaled to the positive's."""

    def rescale(args: CfgArgs) -> mx.array:
        # ComfyUI hands the function "cond"/"uncond" as x - denoised and takes x - result back
        x_orig, sigma, scale = args.x, args.sigma, args.cond_scale
        cond, uncond = x_orig - args.cond_denoised, x_orig - args.uncond_denoised
        x = x_orig / (sigma * sigma + 1.0)
        cond = ((x - (x_orig - cond)) * (sigma**2 + 1.0) ** 0.5) / sigma
        uncond = ((x - (x_orig - uncond)) * (sigma**2 + 1.0) ** 0.5) / sigma
        x_cfg = uncond + scale * (cond - uncond)
        ro_pos = _std(cond)
        ro_cfg = _std(x_cfg)
        x_rescaled = x_cfg * (ro_pos / ro_cfg)
        x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
        return x_orig - (x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5))

    return SamplingPatches(cfg_function=rescale)


def _std(a: mx.array) -> mx.array:
    """torch.std over all but the batch axis (unbiased), kept as [B, 1, 1, 1]."""
    flat = a.reshape(a.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    var = ((flat - mean) ** 2).sum(axis=1, keepdims=True) / (flat.shape[1] - 1)
    return mx.sqrt(var).reshape(-1, 1, 1, 1)


# --- FreeU v2 (Si et al. 2023) ---

def fourier_filter(x: mx.array, threshold: int, scale: float) -> mx.array:
    """Scale the lowest frequencies (a 2*threshold square around the centre) of each channel (NHWC)."""
    h, w = x.shape[1:3]
    cpu = mx.cpu  # FFTs of a skip connection are small; the CPU has them on every backend
    freq = mx.fft.fftn(x.astype(mx.float32), axes=(1, 2), stream=cpu)
    freq = mx.fft.fftshift(freq, axes=(1, 2), stream=cpu)
    mask = np.ones((h, w), np.float32)
    crow, ccol = h // 2, w // 2
    mask[max(crow - threshold, 0) : crow + threshold, max(ccol - threshold, 0) : ccol + threshold] = scale
    freq = freq * mx.array(mask)[None, :, :, None]
    out = mx.real(mx.fft.ifftn(mx.fft.ifftshift(freq, axes=(1, 2), stream=cpu), axes=(1, 2), stream=cpu))
    return out.astype(x.dtype)


def freeu_v2_patches(model_channels: int, b1: float, b2: float, s1: float, s2: float) -> SamplingPatches:
    """ComfyUI's FreeU_V2: at output blocks of 4x / 2x the model's channels, the backbone's first half of
    channels is amplified by (b - 1) * normalised channel mean + 1 and the skip's lowest frequencies scaled
    by s."""
    scales = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def patch(h: mx.array, skip: mx.array, site: Site) -> tuple[mx.array, mx.array]:
        scale = scales.get(int(h.shape[-1]))
        if scale is None:
            return h, skip
        hidden_mean = h.mean(axis=-1, keepdims=True)  # [B, h, w, 1]
        flat = hidden_mean.reshape(hidden_mean.shape[0], -1)
        hidden_max = flat.max(axis=-1).reshape(-1, 1, 1, 1)
        hidden_min = flat.min(axis=-1).reshape(-1, 1, 1, 1)
        hidden_mean = (hidden_mean - hidden_min) / (hidden_max - hidden_min)
        half = h.shape[-1] // 2
        h = mx.concatenate([h[..., :half] * ((scale[0] - 1) * hidden_mean + 1), h[..., half:]], axis=-1)
        return h, fourier_filter(skip, threshold=1, scale=scale[1])

    return SamplingPatches(unet_extras=UNetExtras(output_block_patch=(patch,)))


# --- Perturbed-Attention Guidance (Ahn et al. 2024) ---

def _identity_attention(q, k, v, heads, scale):
    return v


def pag_patches(scale: float, block: tuple[str, int] = ("middle", 0)) -> SamplingPatches:
    """ComfyUI's PerturbedAttentionGuidance: denoised + (cond - cond with the middle block's self-attention
    replaced by the identity) * scale."""

    def post(args: PostCfgArgs) -> mx.array:
        if scale == 0:
            return args.denoised
        perturbed = args.evaluate("cond", args.x, UNetExtras(attn1_replace={block: _identity_attention}))
        return args.denoised + (args.cond_denoised - perturbed) * scale

    return SamplingPatches(post_cfg=(post,))


# --- Self-Attention Guidance (Hong et al. 2023) ---

class _AttentionRecorder:
    """SAG's attn1 replacement at the middle block: plain attention that keeps the softmax scores of the
    negative's chunk of the last call that had one ([b, heads, L, L])."""

    def __init__(self):
        self.scores: mx.array | None = None

    def extras_for(self, sides: tuple[int, ...]) -> UNetExtras:
        if 1 not in sides:
            return UNetExtras()
        chunk, count = sides.index(1), len(sides)

        def attend(q, k, v, heads, scale):
            qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
            sim = mx.softmax((qh.astype(mx.float32) @ kh.astype(mx.float32).transpose(0, 1, 3, 2)) * scale,
                             axis=-1)
            b = q.shape[0] // count
            self.scores = sim[chunk * b : (chunk + 1) * b]
            return merge_heads(sim.astype(vh.dtype) @ vh)

        return UNetExtras(attn1_replace={("middle", 0, 0): attend})


def gaussian_blur_2d(img: mx.array, kernel_size: int, sigma: float) -> mx.array:
    """ComfyUI's gaussian_blur_2d (reflect padding, separable kernel applied as one 2-D one), NHWC."""
    half = (kernel_size - 1) * 0.5
    xs = np.linspace(-half, half, kernel_size, dtype=np.float32)
    pdf = np.exp(-0.5 * (xs / np.float32(sigma)) ** 2)
    k = (pdf / pdf.sum()).astype(np.float32)
    kernel2d = np.outer(k, k).astype(np.float32)
    pad = kernel_size // 2
    x = np.pad(np.array(img, dtype=np.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = img.shape[1:3]
    out = np.zeros(img.shape, np.float32)
    for i in range(kernel_size):
        for j in range(kernel_size):
            out += kernel2d[i, j] * x[:, i : i + h, j : j + w, :]
    return mx.array(out)


def create_blur_map(x0: mx.array, scores: mx.array, sigma: float, threshold: float = 1.0) -> mx.array:
    """ComfyUI's create_blur_map: where the middle block's self-attention gathers most (scores summed over
    queries, averaged over heads, > threshold) x0 is replaced by its blur."""
    b, lh, lw = x0.shape[0], x0.shape[1], x0.shape[2]
    attn = scores.reshape(b, -1, scores.shape[-2], scores.shape[-1])
    mask = (attn.mean(axis=1).sum(axis=1) > threshold).astype(x0.dtype)  # [b, L]
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
    if xx is None:  # ComfyUI fails here (middle maps of 1 or 2 tokens): take the exact factor, else no blur
        if total % max(x, 1):
            return x0
        xx = max(x, 1)
    rows = xx
    cols = total // rows
    mask = mask.reshape(b, rows, cols)
    # F.interpolate's default "nearest": source index floor(dst * in / out)
    ri = np.minimum(np.floor(np.arange(lh) * rows / lh).astype(np.int64), rows - 1)
    ci = np.minimum(np.floor(np.arange(lw) * cols / lw).astype(np.int64), cols - 1)
    mask = mask[:, mx.array(ri)][:, :, mx.array(ci)][..., None]
    blurred = gaussian_blur_2d(x0, kernel_size=9, sigma=sigma)
    return blurred * mask + x0 * (1 - mask)


def sag_patches(scale: float, blur_sigma: float) -> SamplingPatches:
    """ComfyUI's SelfAttentionGuidance: the negative's prediction blurred where the middle block's
    self-attention concentrates is denoised again; the difference guides (the negative is always run)."""
    recorder = _AttentionRecorder()

    def post(args: PostCfgArgs) -> mx.array:
        if min(args.denoised.shape[1:3]) <= 4 or recorder.scores is None:  # too small to pad; no map yet
            return args.denoised
        degraded = create_blur_map(args.uncond_denoised, recorder.scores, blur_sigma)
        degraded_noised = degraded + args.x - args.uncond_denoised
        sag = args.evaluate("uncond", degraded_noised, UNetExtras())
        return args.denoised + (degraded - sag) * scale

    return SamplingPatches(post_cfg=(post,), call_extras=recorder.extras_for, needs_uncond=True)
