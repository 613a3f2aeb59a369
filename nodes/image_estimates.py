"""Memory estimates of the image, latent and mask operations (nodes/image_ops.py, latent_ops.py, masks.py),
in the terms of nodes/estimates.py: the nodes that make or grow arrays say how big, so an EmptyImage of
4096 x 16384² or a 8x ImageScaleBy of a huge image is refused before it runs; size-keeping nodes pass the
size on. MASK infos are ("mask", batch, height, width)."""

from __future__ import annotations

import math

from graph.memory_plan import Estimate, register_estimate
from nodes.estimates import F32, _image_bytes, _latent_bytes, _size
from sd.image.ops import size_for_megapixels, size_keeping_aspect


def _images(b: int, h: int, w: int, copies: int = 2) -> Estimate:
    """`copies`: the output plus the numpy working copy the operation makes."""
    return Estimate(held=_image_bytes(b, h, w), working=(copies - 1) * _image_bytes(b, h, w),
                    outputs=(("image", b, h, w),), detail=f"{b} image(s) of {w}x{h} pixels")


def empty_image(lit, inputs, files) -> Estimate:
    return _images(lit["batch_size"], lit["height"], lit["width"], copies=1)


def solid_mask(lit, inputs, files) -> Estimate:
    h, w = lit["height"], lit["width"]
    return Estimate(held=h * w * F32, outputs=(("mask", 1, h, w),), detail=f"a {w}x{h} mask")


def image_scale(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("image"), "image")
    if size is None or (lit["width"] == 0 and lit["height"] == 0):
        return Estimate(outputs=(inputs.get("image"),))
    b, h, w = size
    width, height = size_keeping_aspect(h, w, lit["width"], lit["height"])
    return _images(b, height, width)


def image_scale_by(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("image"), "image")
    if size is None:
        return Estimate()
    b, h, w = size
    return _images(b, round(h * lit["scale_by"]), round(w * lit["scale_by"]))


def image_scale_to_pixels(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("image"), "image")
    if size is None:
        return Estimate()
    b, h, w = size
    width, height = size_for_megapixels(h, w, lit["megapixels"], lit["resolution_steps"])
    return _images(b, height, width)


def pad_for_outpaint(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("image"), "image")
    if size is None:
        return Estimate()
    b, h, w = size
    h, w = h + lit["top"] + lit["bottom"], w + lit["left"] + lit["right"]
    est = _images(b, h, w)
    return Estimate(held=est.held + h * w * F32, working=est.working,
                    outputs=(("image", b, h, w), ("mask", 1, h, w)), detail=est.detail)


def image_batch(lit, inputs, files) -> Estimate:
    first, second = _size(inputs.get("image1"), "image"), _size(inputs.get("image2"), "image")
    if first is None or second is None:
        return Estimate()
    return _images(first[0] + second[0], first[1], first[2])


def repeat_image_batch(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("image"), "image")
    if size is None:
        return Estimate()
    b, h, w = size
    return _images(b * lit["amount"], h, w)


def latent_batch(lit, inputs, files) -> Estimate:
    first, second = _size(inputs.get("samples1"), "latent"), _size(inputs.get("samples2"), "latent")
    if first is None or second is None:
        return Estimate()
    return _latents(first[0] + second[0], first[1], first[2])


def same_image(name: str):
    def estimate(lit, inputs, files) -> Estimate:
        size = _size(inputs.get(name), "image")
        return _images(*size) if size else Estimate()
    return estimate


def _latents(b: int, h: int, w: int) -> Estimate:
    return Estimate(held=_latent_bytes(b, h, w), outputs=(("latent", b, h, w),),
                    detail=f"{b}x{h}x{w} latents")


def latent_upscale_by(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("samples"), "latent")
    if size is None:
        return Estimate()
    b, h, w = size
    return _latents(b, round(h * lit["scale_by"]), round(w * lit["scale_by"]))


def repeat_latent_batch(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("samples"), "latent")
    if size is None:
        return Estimate()
    b, h, w = size
    return _latents(b * lit["amount"], h, w)


def same_latent(name: str):
    def estimate(lit, inputs, files) -> Estimate:
        size = _size(inputs.get(name), "latent")
        if size is None:
            return Estimate()
        return Estimate(held=2 * _latent_bytes(*size), outputs=(("latent",) + tuple(size),),
                        detail="{}x{}x{} latents".format(*size))
    return estimate


def load_image_mask(lit, inputs, files) -> Estimate:
    from nodes.images import image_header

    path = files.get("image")
    if path is None:
        return Estimate()
    (w, h), _ = image_header(path)
    return Estimate(held=h * w * F32, working=h * w * 4, outputs=(("mask", 1, h, w),),
                    detail=f"a {w}x{h} mask decoded from {path.name}")


def grow_mask(lit, inputs, files) -> Estimate:
    size = _size(inputs.get("mask"), "mask")
    if size is None:
        return Estimate()
    nbytes = math.prod(size) * F32
    return Estimate(held=nbytes, working=3 * nbytes, outputs=(("mask",) + tuple(size),), detail="the mask")


def register() -> None:
    table = {"EmptyImage": empty_image, "SolidMask": solid_mask, "ImageScale": image_scale,
             "ImageScaleBy": image_scale_by, "ImageScaleToTotalPixels": image_scale_to_pixels,
             "ImagePadForOutpaint": pad_for_outpaint, "ImageBatch": image_batch,
             "ImageInvert": same_image("image"), "ImageCompositeMasked": same_image("destination"),
             "LatentUpscaleBy": latent_upscale_by, "RepeatLatentBatch": repeat_latent_batch,
             "LatentComposite": same_latent("samples_to"),
             "LatentCompositeMasked": same_latent("destination"),
             "LatentBlend": same_latent("samples1"), "GrowMask": grow_mask,
             "RepeatImageBatch": repeat_image_batch, "LatentBatch": latent_batch,
             "LoadImageMask": load_image_mask}
    for name, fn in table.items():
        register_estimate(name, fn)
