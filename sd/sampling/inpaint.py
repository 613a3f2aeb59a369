"""Inpainting while sampling, as ComfyUI does it: the noise mask re-imposes the known region at every step
(`KSamplerX0Inpaint`), optionally thresholded per step (`DifferentialDiffusion`), and 9-channel inpainting
UNets get [mask, masked-image latent] concatenated to their input (`BaseModel.concat_cond`).

Masks here are NHWC: a prepared denoise mask is [B, h, w, C] at the latent's size, 1 = the region to change.
Latents are *scaled* (x 0.18215) inside sampling, as in ComfyUI after `process_latent_in`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from sd.image.bilinear import bilinear
from sd.image.resize import center_crop_to_aspect
from sd.models.unet_extras import UNetExtras

# fn(sigma, mask, sigmas, model_sampling) -> mask: ComfyUI's model_options["denoise_mask_function"]
MaskFunction = Callable[[float, mx.array, np.ndarray, object], mx.array]

# SD1.x latents of a mid-grey image (pixel value 0): what an inpainting UNet sees as the masked image when
# there is no mask at all (ComfyUI's `blank_inpaint_image_like`).
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def repeat_to_batch(a: np.ndarray, batch: int) -> np.ndarray:
    """ComfyUI's `repeat_to_batch_size`: cut, or tiled and cut."""
    if a.shape[0] > batch:
        return a[:batch]
    if a.shape[0] < batch:
        return np.concatenate([a] * math.ceil(batch / a.shape[0]))[:batch]
    return a


def resize_to_batch(a: np.ndarray, batch: int) -> np.ndarray:
    """ComfyUI's `resize_to_batch_size`: batch entries picked evenly (what the concat conditions use)."""
    n = a.shape[0]
    if n == batch:
        return a
    if batch <= 1:
        return a[:batch]
    if batch < n:
        scale = (n - 1) / (batch - 1)
        picks = [min(round(i * scale), n - 1) for i in range(batch)]
    else:
        scale = n / batch
        picks = [min(math.floor((i + 0.5) * scale), n - 1) for i in range(batch)]
    return a[picks]


def _mask_nhwc(mask) -> mx.array:
    """A MASK [B, H, W] (or [B, 1, H, W] / [H, W], ComfyUI's shapes) as [B, H, W, 1] float32."""
    m = mx.array(mask).astype(mx.float32)
    m = m.reshape((-1, m.shape[-2], m.shape[-1]))
    return m[..., None]


def prepare_mask(mask, latent_shape: Sequence[int]) -> mx.array:
    """ComfyUI's `prepare_mask` (reshape_mask): bilinear to the latent's size (align_corners=False), repeated
    over its channels and batch -> [B, h, w, C]."""
    b, h, w, c = latent_shape
    m = repeat_to_batch(bilinear(np.array(_mask_nhwc(mask)), h, w), b)
    return mx.array(np.ascontiguousarray(np.broadcast_to(m, (b, h, w, c)), dtype=np.float32))


@dataclass
class MaskedDenoiser:
    """KSamplerX0Inpaint: before the model, the known region (mask 0) of x is replaced by the input latent
    noised to this sigma with the run's noise; after, the prediction there is the input latent itself. So
    the last step (to sigma 0) returns the known region exactly."""

    denoiser: Callable[[mx.array, float], mx.array]
    latent: mx.array  # scaled, [B, h, w, C]
    noise: mx.array  # the run's noise (zeros without add_noise)
    mask: mx.array  # prepared, [B, h, w, C]
    sigmas: np.ndarray
    model_sampling: object
    mask_function: MaskFunction | None = None

    def __call__(self, x: mx.array, sigma: float, *args, **kwargs) -> mx.array:
        mask = self.mask
        if self.mask_function is not None:
            mask = self.mask_function(sigma, mask, self.sigmas, self.model_sampling)
        keep = 1.0 - mask
        known = self.model_sampling.noise_scaling(float(sigma), self.noise, self.latent)
        x = x * mask + known * keep
        out = self.denoiser(x, sigma, *args, **kwargs)
        return out * mask + self.latent * keep


def differential_diffusion(strength: float = 1.0) -> MaskFunction:
    """ComfyUI's DifferentialDiffusion: at each step only the part of the mask at or above a threshold that
    falls from 1 (the first sigma) to 0 (the last, or sigma_min) is changed, so grey mask values mean "change
    this much"; strength < 1 blends that binary mask with the soft one."""

    def forward(sigma: float, mask: mx.array, sigmas: np.ndarray, ms) -> mx.array:
        sigma_to = max(ms.sigma_min, float(sigmas[-1]))
        ts_from = float(ms.timestep(np.float32(sigmas[0])))
        ts_to = float(ms.timestep(np.float32(sigma_to)))
        current = float(ms.timestep(np.float32(sigma)))
        with np.errstate(divide="ignore", invalid="ignore"):
            threshold = np.float32(current - ts_to) / np.float32(ts_from - ts_to)
        binary = (mask >= float(threshold)).astype(mask.dtype)
        if strength and strength < 1:
            return strength * binary + (1 - strength) * mask
        return binary

    return forward


# --- the 9-channel inpainting UNet's extra input ---------------------------------------------------


def _upscale_center(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """common_upscale(..., "bilinear", "center") on NHWC."""
    return bilinear(np.array(center_crop_to_aspect(mx.array(a), w, h)), h, w)


def inpaint_concat(latent_shape: Sequence[int], latent: mx.array, denoise_mask: mx.array | None,
                   concat_latent_image: mx.array | None = None, concat_mask=None,
                   latent_scale: float = 0.18215) -> mx.array:
    """ComfyUI's `concat_cond` for concat keys ("mask", "masked_image"): [B, h, w, 1 + C].

    The mask is the entry's `concat_mask`, else the run's denoise mask; resized (bilinear, centre-cropped to
    the aspect), rounded. The masked image is the entry's `concat_latent_image` (unscaled; scaled here),
    else the run's (scaled) input latent. With no mask at all: a mask of ones and a mid-grey image."""
    b, h, w, c = latent_shape
    if concat_mask is None and denoise_mask is None:
        ones = np.ones((b, h, w, 1), np.float32)
        blank = np.broadcast_to(np.array(BLANK_INPAINT_LATENT, np.float32)[:c], (b, h, w, c))
        return mx.array(np.concatenate([ones, blank], axis=-1))
    if concat_latent_image is None:
        image = np.array(latent.astype(mx.float32))
    else:
        image = np.array(concat_latent_image.astype(mx.float32)) * np.float32(latent_scale)
    if image.shape[1:] != (h, w, c):
        image = _upscale_center(image, h, w)
    image = resize_to_batch(image, b)
    if concat_mask is not None:
        mask = np.array(_mask_nhwc(concat_mask))
    else:
        mask = np.array(denoise_mask.astype(mx.float32))[..., :1]
    if mask.shape[1:3] != (h, w):
        mask = _upscale_center(mask, h, w)
    mask = resize_to_batch(np.round(mask), b)
    return mx.array(np.ascontiguousarray(np.concatenate([mask, image], axis=-1), dtype=np.float32))


@dataclass
class ConcatSource:
    """An extras source (sd/sampling/conds.py) giving every UNet call of its entries the concat channels,
    cropped to each chunk's area and repeated to its batch (ComfyUI's CONDNoiseShape)."""

    concat: mx.array  # [B, h, w, k]
    _crops: dict = field(default_factory=dict)

    def unet_extras(self, x: mx.array, timestep, context, areas) -> UNetExtras:
        key = (x.shape[0], tuple(tuple(a) if a is not None else None for a in areas))
        if key not in self._crops:
            per_chunk = x.shape[0] // max(1, len(areas))
            parts = []
            for area in areas:
                part = self.concat
                if area is not None:
                    ah, aw, y, x0 = area
                    part = part[:, y:y + ah, x0:x0 + aw]
                parts.append(mx.array(resize_to_batch(np.array(part), per_chunk)))
            self._crops[key] = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        return UNetExtras(concat=self._crops[key])
