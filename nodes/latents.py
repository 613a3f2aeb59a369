"""Latent nodes: EmptyLatent, LatentUpscale, VAEEncode, VAEDecode."""

from __future__ import annotations

import mlx.core as mx

from graph import IMAGE, LATENT, VAE, Choice, Int, node
from nodes import models
from nodes.finite import check_finite
from nodes.values import Latent
from sd.image.codec import decode_image, encode_image
from sd.image.resize import LATENT_METHODS, center_crop_to_aspect, resize

MAX_RESOLUTION = 16384
LATENT_CHANNELS = 4
UPSCALE_METHODS = LATENT_METHODS
CROP_METHODS = ("disabled", "center")


class Int8(Int):
    """An integer that must be a multiple of 8 (pixel sizes: latents are 1/8 of the image)."""

    def check(self, value):
        value = super().check(value)
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (try {value // 8 * 8} or {value // 8 * 8 + 8})")
        return value

    def describe(self) -> str:
        return super().describe() + " multiple of 8"

    def json_schema(self) -> dict:
        return super().json_schema() | {"multipleOf": 8}


@node(category="latent", outputs=(LATENT,))
def EmptyLatent(width: Int8(16, MAX_RESOLUTION) = 512, height: Int8(16, MAX_RESOLUTION) = 512,
                batch_size: Int(1, 4096) = 1):
    """A batch of empty latents for text-to-image (ComfyUI's EmptyLatentImage)."""
    return Latent(mx.zeros((batch_size, height // 8, width // 8, LATENT_CHANNELS), dtype=mx.float32))


@node(category="latent", outputs=(LATENT,))
def LatentUpscale(samples: LATENT, upscale_method: Choice(UPSCALE_METHODS) = "nearest-exact",
                  width: Int8(0, MAX_RESOLUTION) = 512, height: Int8(0, MAX_RESOLUTION) = 512,
                  crop: Choice(CROP_METHODS) = "disabled"):
    """Resize latents to width x height pixels (÷8 in latent space). A size of 0 keeps the aspect
    ratio from the other; both 0 returns the input."""
    latent: Latent = samples
    x = latent.samples
    _, h, w, _ = x.shape
    if width == 0 and height == 0:
        return latent
    if width == 0:  # ComfyUI's rule: the other side from the aspect ratio, at least 64 pixels
        height = max(64, height)
        width = max(64, round(w * height / h))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(h * width / w))
    else:
        width, height = max(64, width), max(64, height)
    if crop == "center":
        x = center_crop_to_aspect(x, width, height)
    resized = resize(x, height // 8, width // 8, upscale_method)
    mx.eval(resized)
    return Latent(resized, latent.batch_index)


@node(category="latent", outputs=(LATENT,))
def VAEEncode(pixels: IMAGE, vae: VAE, ctx=None):
    """Encode images into latents (for img2img). Sides are cropped to multiples of 8, centred."""
    model = models.vae_for(vae, ctx.log)
    latent = encode_image(model, pixels, encode=models.vae_encoder(model))
    mx.eval(latent)
    check_finite(latent, "the encoded latents", vae, "vae")
    return Latent(latent)


@node(category="latent", outputs=(IMAGE,))
def VAEDecode(samples: LATENT, vae: VAE, ctx=None):
    """Decode latents into images (NHWC, values in [0, 1])."""
    latent: Latent = samples
    model = models.vae_for(vae, ctx.log)
    # a large image decodes in tiles (a 1024² decode takes ~20 s on a CPU): each tile is a progress step
    image = decode_image(model, latent.samples, decode=models.vae_decoder(model), progress=ctx.progress)
    mx.eval(image)
    check_finite(image, "the decoded images", vae, "vae")
    return image
