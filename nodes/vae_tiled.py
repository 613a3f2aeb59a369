"""VAEDecodeTiled and VAEEncodeTiled: ComfyUI's tiled VAE nodes (sd/image/tiled_scale.py), same inputs,
defaults and result. temporal_size / temporal_overlap only matter for video VAEs in ComfyUI; SD1.x VAEs
ignore them, here as there."""

from __future__ import annotations

import mlx.core as mx

from graph import IMAGE, LATENT, VAE, Int, node
from nodes import models
from nodes.finite import check_finite
from nodes.values import Latent

SCALE = 8  # SD1.x VAE: pixels per latent pixel


@node(category="latent", outputs=(IMAGE,))
def VAEDecodeTiled(samples: LATENT, vae: VAE, tile_size: Int(64, 4096) = 512, overlap: Int(0, 4096) = 64,
                   temporal_size: Int(8, 4096) = 64, temporal_overlap: Int(4, 4096) = 8, ctx=None):
    """Decode latents in overlapping tiles, as ComfyUI's "VAE Decode (Tiled)".

    tile_size and overlap are in pixels (overlap at most tile_size/4, lowered as ComfyUI does); three
    tilings averaged. For images too large to decode at once."""
    from sd.image.tiled_scale import decode_tiled

    latent: Latent = samples
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    model = models.vae_for(vae, ctx.log)
    image = decode_tiled(models.vae_decoder(model), latent.samples.astype(model.dtype), tile_size // SCALE,
                         overlap // SCALE, SCALE)
    image = mx.clip((image + 1.0) / 2.0, 0.0, 1.0)
    mx.eval(image)
    check_finite(image, "the decoded images", vae, "vae")
    return image


@node(category="latent", outputs=(LATENT,))
def VAEEncodeTiled(pixels: IMAGE, vae: VAE, tile_size: Int(64, 4096) = 512, overlap: Int(0, 4096) = 64,
                   temporal_size: Int(8, 4096) = 64, temporal_overlap: Int(4, 4096) = 8, ctx=None):
    """Encode images in overlapping tiles, as ComfyUI's "VAE Encode (Tiled)".

    tile_size and overlap are in pixels, three tilings averaged; sides cropped to multiples of 8
    (centred) like VAEEncode. The overlap must be below tile_size/2 (the narrow tiling's width)."""
    from sd.image.tiled_scale import encode_tiled

    if overlap >= tile_size // 2:
        raise ValueError(f"overlap {overlap} must be smaller than half of tile_size {tile_size}")
    _, h, w, _ = pixels.shape
    h8, w8 = h // SCALE * SCALE, w // SCALE * SCALE
    if h8 == 0 or w8 == 0:
        raise ValueError(f"image of {w}x{h} pixels is too small to encode (at least 8x8)")
    dy, dx = (h % SCALE) // 2, (w % SCALE) // 2
    image = pixels[:, dy:dy + h8, dx:dx + w8, :3] * 2.0 - 1.0
    model = models.vae_for(vae, ctx.log)
    latent = encode_tiled(models.vae_encoder(model), image.astype(model.dtype), tile_size, overlap, SCALE)
    mx.eval(latent)
    check_finite(latent, "the encoded latents", vae, "vae")
    return Latent(latent.astype(mx.float32))
