"""Memory estimates of the SD nodes (graph/memory_plan.py): lower bounds from the literal inputs and the
sizes flowing along links, so that a 16384x16384 image, a batch of 4096 or an image file claiming 8000x8000
pixels is refused before anything runs, naming the node, instead of the process being killed.

Infos passed along links: LATENT ("latent", batch, height, width) in latent pixels; IMAGE ("image", batch,
height, width) in image pixels. Figures are float32 (the CPU's precision; fp16 on a GPU needs about half of
the activations, not of the outputs).
"""

from __future__ import annotations

from graph.memory_plan import Estimate, register_estimate
from sd.image.tiling import DEFAULT_TILE, SCALE, TILE_THRESHOLD

F32 = 4
LATENT_CHANNELS = 4
UNET_CHANNELS = 320   # SD1.x model channels at full latent resolution
UNET_LIVE = 12        # full-resolution UNet tensors alive at once (skips, resnet in/out): a lower bound
VAE_CHANNELS = 128    # the VAE's channels at full image resolution
VAE_LIVE = 4


def _latent_bytes(b: int, h: int, w: int) -> int:
    return b * h * w * LATENT_CHANNELS * F32


def _image_bytes(b: int, h: int, w: int) -> int:
    return b * h * w * 3 * F32


def _size(info, kind: str):
    return info[1:] if isinstance(info, tuple) and info and info[0] == kind else None


def empty_latent(lit, inputs, files) -> Estimate:
    b, h, w = lit["batch_size"], lit["height"] // SCALE, lit["width"] // SCALE
    return Estimate(held=_latent_bytes(b, h, w), outputs=(("latent", b, h, w),),
                    detail=f"{b}x{h}x{w} latents")


def latent_upscale(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("samples"), "latent")
    if size is None:
        return Estimate()
    b, h, w = size
    width, height = lit["width"], lit["height"]
    if width or height:
        width, height = max(64, width or round(w * SCALE * max(64, height) / h)), \
            max(64, height or round(h * SCALE * max(64, width) / w))
        h, w = height // SCALE, width // SCALE
    return Estimate(held=_latent_bytes(b, h, w), outputs=(("latent", b, h, w),),
                    detail=f"{b}x{h}x{w} latents")


def sampler(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("latent_image"), "latent")
    if size is None:
        return Estimate()
    b, h, w = size
    working = 2 * b * h * w * UNET_CHANNELS * F32 * UNET_LIVE  # x2: the cond and uncond halves of CFG
    return Estimate(held=_latent_bytes(b, h, w), working=working, outputs=(("latent", b, h, w),),
                    detail=f"UNet activations for {b} latent(s) of {w * SCALE}x{h * SCALE} pixels")


def custom_sampler(lit, inputs, files) -> Estimate:
    """SamplerCustom / SamplerCustomAdvanced: a sampler's memory, two latent outputs (output, denoised)."""
    est = sampler(lit, inputs, files)
    if not est.outputs:
        return est
    return Estimate(held=2 * est.held, working=est.working, outputs=est.outputs * 2, detail=est.detail)


def vae_decode(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("samples"), "latent")
    if size is None:
        return Estimate()
    b, h, w = size
    tiled = h * w > TILE_THRESHOLD
    side = DEFAULT_TILE * SCALE
    pixels = b * side * side if tiled else b * h * w * SCALE * SCALE
    H, W = h * SCALE, w * SCALE
    return Estimate(held=_image_bytes(b, H, W), working=pixels * VAE_CHANNELS * F32 * VAE_LIVE,
                    outputs=(("image", b, H, W),),
                    detail=f"{b} image(s) of {W}x{H} pixels and the VAE decoder's activations")


def vae_encode(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("pixels"), "image")
    if size is None:
        return Estimate()
    b, H, W = size
    h, w = H // SCALE, W // SCALE
    return Estimate(held=_latent_bytes(b, h, w), working=b * H * W * VAE_CHANNELS * F32 * VAE_LIVE,
                    outputs=(("latent", b, h, w),),
                    detail=f"the VAE encoder's activations for {b} image(s) of {W}x{H} pixels")


def vae_encode_for_inpaint(lit, inputs, files) -> Estimate:
    """VAEEncodeForInpaint: an encode plus a copy of the pixels and the grown mask."""
    est = vae_encode(lit, inputs, files)
    size = _size(inputs.get("pixels"), "image")
    if size is None:
        return est
    b, H, W = size
    return Estimate(held=est.held + b * H * W * F32, working=est.working + _image_bytes(b, H, W),
                    outputs=est.outputs, detail=est.detail)


def inpaint_model_conditioning(lit, inputs, files) -> Estimate:
    """InpaintModelConditioning: two encodes (the grey-filled and the whole image); the latent output."""
    est = vae_encode_for_inpaint(lit, inputs, files)
    if not est.outputs:
        return est
    latent = est.outputs[0]
    return Estimate(held=est.held + _latent_bytes(*latent[1:]), working=est.working,
                    outputs=(None, None, latent), detail=est.detail)


def load_image(lit, inputs, files) -> Estimate:
    from nodes.images import image_header

    path = files.get("image")
    if path is None:
        return Estimate()
    (W, H), frames = image_header(path)
    return Estimate(held=_image_bytes(frames, H, W) + frames * H * W * F32,
                    outputs=(("image", frames, H, W), None),
                    detail=f"{frames} frame(s) of {W}x{H} pixels decoded from {path.name}")


def save_image(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("images"), "image")
    if size is None:
        return Estimate()
    b, H, W = size
    return Estimate(working=_image_bytes(b, H, W) + H * W * 3,
                    detail=f"{b} image(s) of {W}x{H} pixels to encode")


def load_checkpoint(lit, inputs, files) -> Estimate:
    path = files.get("ckpt_name")
    path = path[0] if isinstance(path, list) else path  # [checkpoint, its companion .yaml]
    size = path.stat().st_size if path is not None else 0
    return Estimate(held=size, outputs=(None, None, None), detail="the checkpoint's weights")


UPSCALE_FEATURES = 64  # ESRGAN's feature width at the upscaled tile's resolution
UPSCALE_LIVE = 3       # full-resolution feature maps alive at once (upsample, conv, activation)


def upscale_model_loader(lit, inputs, files) -> Estimate:
    from sd.errors import CheckpointError
    from sd.loading.upscale_models import inspect_upscale_model

    path = files.get("model_name")
    if path is None:
        return Estimate()
    try:
        info = ("upscale", inspect_upscale_model(path).scale)  # header only
    except CheckpointError:
        info = None  # the node itself reports the file
    return Estimate(held=path.stat().st_size, outputs=(info,), detail="the upscale model's weights")


def image_upscale(lit, inputs, files) -> Estimate:
    from sd.image.upscale import TILE

    size, model = _size(inputs.get("image"), "image"), inputs.get("upscale_model")
    if size is None or not (isinstance(model, tuple) and model[0] == "upscale"):
        return Estimate()
    b, H, W = size
    s = model[1]
    tile = min(TILE, H) * s * min(TILE, W) * s  # one tile's output pixels: what the activations scale with
    # the sums of the tiles and their weights (host memory) beside the result
    sums = _image_bytes(1, H * s, W * s) + H * s * W * s * F32
    working = sums + tile * UPSCALE_FEATURES * F32 * UPSCALE_LIVE
    return Estimate(held=_image_bytes(b, H * s, W * s), working=working,
                    outputs=(("image", b, H * s, W * s),),
                    detail=f"{b} image(s) of {W * s}x{H * s} pixels and one tile's activations")


def register() -> None:
    table = {"EmptyLatent": empty_latent, "LatentUpscale": latent_upscale, "KSampler": sampler,
             "KSamplerAdvanced": sampler, "VAEDecode": vae_decode, "VAEEncode": vae_encode,
             "LoadImage": load_image, "SaveImage": save_image, "LoadCheckpoint": load_checkpoint,
             "UpscaleModelLoader": upscale_model_loader, "ImageUpscaleWithModel": image_upscale,
             "SamplerCustom": custom_sampler, "SamplerCustomAdvanced": custom_sampler,
             "VAEEncodeForInpaint": vae_encode_for_inpaint,
             "InpaintModelConditioning": inpaint_model_conditioning}
    for name, fn in table.items():
        register_estimate(name, fn)
