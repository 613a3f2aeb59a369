"""Between pixels and latents: what VAEEncode and VAEDecode compute, for a VAE run plainly or accelerated.

Images are NHWC float32 in [0, 1] (what image nodes pass around); latents are unscaled VAE space, float32.
`encode` / `decode` default to the VAE's own methods; callers pass an accelerated model's (sd/accel).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from sd.image import tiling

SCALE = tiling.SCALE  # image pixels per latent pixel


def encode_image(vae, pixels: mx.array, encode: Callable[[mx.array], mx.array] | None = None) -> mx.array:
    """pixels [B,H,W,C>=3] in [0,1] -> latent [B,H//8,W//8,4]; sides that are not multiples of 8 are cropped,
    centred (ComfyUI's VAEEncode), and an alpha channel is dropped."""
    _, h, w, _ = pixels.shape
    h8, w8 = h // SCALE * SCALE, w // SCALE * SCALE
    if h8 == 0 or w8 == 0:
        raise ValueError(f"image of {w}x{h} pixels is too small to encode (at least 8x8)")
    dy, dx = (h % SCALE) // 2, (w % SCALE) // 2
    image = pixels[:, dy:dy + h8, dx:dx + w8, :3]
    latent = (encode or vae.encode)(image * 2.0 - 1.0)
    return latent.astype(mx.float32)


def decode_image(vae, latent: mx.array, decode: Callable[[mx.array], mx.array] | None = None,
                 progress: tiling.Progress | None = None) -> mx.array:
    """latent -> image [B,H,W,3] in [0,1], float32; decoded in tiles above tiling.TILE_THRESHOLD latent
    pixels so large images fit in memory (identical to one decode below it); `progress(done, total)` after
    each tile."""
    image = tiling.decode(vae, latent.astype(vae.dtype), decode_fn=decode, progress=progress)
    return mx.clip((image.astype(mx.float32) + 1.0) / 2.0, 0.0, 1.0)
