"""Inpainting nodes (ComfyUI's names, inputs and defaults): SetLatentNoiseMask, VAEEncodeForInpaint,
InpaintModelConditioning, DifferentialDiffusion, and what the samplers add for them: the noise mask
honoured by KSampler(Advanced) and SamplerCustom(Advanced) (sd/sampling/inpaint.py), and a 9-channel
inpainting UNet's concat input built for every conditioning entry.

A LATENT's `noise_mask` is a MASK [B, H, W] at any resolution (ComfyUI keeps [B, 1, H, W]); the sampler
resizes it to the latent. On conditioning entries, `concat_latent_image` is an unscaled NHWC latent and
`concat_mask` a MASK, as InpaintModelConditioning sets them (ComfyUI's option keys).
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import numpy as np

from graph import CONDITIONING, IMAGE, LATENT, MASK, MODEL, VAE, Boolean, Float, Int, node
from nodes import models
from nodes.finite import check_finite
from nodes.values import Conditioning, Latent, ModelRecipe
from sd.image.codec import encode_image
from sd.image.inpaint import grow_mask, masked_pixels

INPAINT_IN_CHANNELS = 9  # latent + mask + masked-image latent
CONCAT_OPTION = "inpaint_concat"  # the per-run extras source added to each entry (not a ComfyUI key)


@node(category="latent/inpaint", outputs=(LATENT,))
def SetLatentNoiseMask(samples: LATENT, mask: MASK):
    """Only the masked part of the latent is changed when sampling: the rest is re-imposed at every step
    (the input latent noised to that step's level), and returned as it was."""
    latent: Latent = samples
    m = mx.array(mask).astype(mx.float32)
    return Latent(latent.samples, latent.batch_index, m.reshape((-1, m.shape[-2], m.shape[-1])))


def _encode(vae, pixels: mx.array, ctx) -> mx.array:
    model = models.vae_for(vae, ctx.log)
    latent = encode_image(model, pixels, encode=models.vae_encoder(model))
    mx.eval(latent)
    check_finite(latent, "the encoded latents", vae, "vae")
    return latent


@node(category="latent/inpaint", outputs=(LATENT,))
def VAEEncodeForInpaint(pixels: IMAGE, vae: VAE, mask: MASK, grow_mask_by: Int(0, 64) = 6, ctx=None):
    """Encode images for inpainting: the masked pixels become mid-grey before encoding, and the latent gets
    the mask, grown by grow_mask_by pixels, as its noise mask (sides cropped to multiples of 8, centred).
    Use with denoise 1.0: the masked region starts from grey, not from the picture."""
    filled, m = masked_pixels(mx.array(pixels), mask)
    latent = _encode(vae, filled, ctx)
    return Latent(latent, None, grow_mask(m, grow_mask_by))


@node(category="conditioning/inpaint", outputs=(CONDITIONING, CONDITIONING, LATENT),
      output_names=("positive", "negative", "latent"))
def InpaintModelConditioning(positive: CONDITIONING, negative: CONDITIONING, vae: VAE, pixels: IMAGE,
                             mask: MASK, noise_mask: Boolean() = True, ctx=None):
    """Conditioning for inpainting models: both conditionings carry the mask and the latent of the image
    with the masked pixels mid-grey (what a 9-channel UNet takes), and the latent of the whole image is
    returned, with the mask as its noise mask unless noise_mask is off (then the whole image is resampled
    and only the model keeps to it). Works with any denoise."""
    image = mx.array(pixels)
    filled, m = masked_pixels(image, mask)
    concat_latent = _encode(vae, filled, ctx)
    latent = _encode(vae, image, ctx)
    cond: list[Conditioning] = [c.with_options(concat_latent_image=concat_latent, concat_mask=m)
           for c in (positive, negative)]
    return cond[0], cond[1], Latent(latent, None, m if noise_mask else None)


@node(category="_for_testing", outputs=(MODEL,))
def DifferentialDiffusion(model: MODEL, strength: Float(0.0, 1.0) = 1.0):
    """Soft inpainting masks: at each step only where the noise mask is at least a threshold falling from 1
    to 0 over the steps is changed, so grey mask values change the image partly (strength < 1 blends that
    with the plain mask). Needs a latent with a noise mask."""
    recipe: ModelRecipe = model
    return recipe.with_sampling_patch("DifferentialDiffusion", strength=strength)


def denoise_mask_function(recipe: ModelRecipe):
    """The model's per-step mask function (the last DifferentialDiffusion applied, as ComfyUI replaces it)."""
    from sd.sampling.inpaint import differential_diffusion

    found = [p for p in getattr(recipe, "sampling_patches", ()) if p.kind == "DifferentialDiffusion"]
    return differential_diffusion(found[-1].setting("strength")) if found else None


def _digest(a) -> tuple | None:
    if a is None:
        return None
    data = np.ascontiguousarray(np.array(mx.array(a).astype(mx.float32)))
    return data.shape, hashlib.sha256(data.tobytes()).hexdigest()


def with_inpaint_concat(unet, sides: list[list], latent: Latent) -> list[list]:
    """For a 9-channel UNet: each (cond, options) entry gets the concat source its options call for (ComfyUI
    builds `c_concat` for every entry of an inpainting model); equal concat inputs share one source, so
    positive and negative still share UNet calls. Other UNets: the entries unchanged."""
    if unet.config.in_channels != INPAINT_IN_CHANNELS:
        return sides
    from sd.sampling.inpaint import ConcatSource, inpaint_concat, prepare_mask
    from sd.sampling.model_sampling import LATENT_SCALE_FACTOR

    shape = latent.samples.shape
    denoise = prepare_mask(latent.noise_mask, shape) if latent.noise_mask is not None else None
    scaled = latent.samples * LATENT_SCALE_FACTOR
    sources: dict = {}

    def source(options) -> ConcatSource:
        image, mask = options.get("concat_latent_image"), options.get("concat_mask")
        key = (_digest(image), _digest(mask))
        if key not in sources:
            sources[key] = ConcatSource(inpaint_concat(shape, scaled, denoise, image, mask))
        return sources[key]

    return [[(cond, {**options, CONCAT_OPTION: source(options)}) for cond, options in side] for side in sides]
