"""ComfyUI's mask nodes. MASK is [B, H, W] float32 in [0, 1] (1 = the region to change); the maths is in
sd/image/masks.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from graph import IMAGE, MASK, Boolean, Choice, Float, Int, String, node
from nodes.images import image_header
from nodes.latents import MAX_RESOLUTION
from nodes.paths import resolve_image
from sd.image import masks

LOAD_CHANNELS = ("alpha", "red", "green", "blue")


@node(category="mask", outputs=(MASK,), reads_files={"image": resolve_image})
def LoadImageMask(image: String(), channel: Choice(LOAD_CHANNELS) = "alpha", ctx=None):
    """One channel of an image file in the input folder as a MASK [1, H, W].

    Alpha is inverted (1 - alpha: transparent pixels are the ones to paint); an image without alpha
    counts as opaque."""
    from PIL import Image, ImageOps

    path = resolve_image(image, ctx.folders)
    image_header(path)  # the size the file claims, checked before anything is decoded
    with Image.open(path) as img:
        frame = ImageOps.exif_transpose(img)
        if frame.getbands() != ("R", "G", "B", "A"):
            if frame.mode == "I":  # 16-bit greyscale PNGs
                frame = frame.point(lambda v: v * (1 / 255))
            frame = frame.convert("RGBA")
        values = np.asarray(frame.getchannel(channel[0].upper()), dtype=np.float32) / 255.0
    if channel == "alpha":
        values = 1.0 - values
    return mx.array(values[None])


@node(category="mask", outputs=(MASK,))
def ImageToMask(image: IMAGE, channel: Choice(masks.CHANNELS) = "red"):
    """One channel of the images as masks (ComfyUI's "Convert Image to Mask")."""
    return masks.from_image(image, channel)


@node(category="mask", outputs=(MASK,))
def ImageColorToMask(image: IMAGE, color: Int(0, 0xFFFFFF) = 0):
    """1 where a pixel is exactly `color` (0xRRGGBB as an integer, channels rounded to 0-255), else 0."""
    return masks.color_to_mask(image, color)


@node(category="mask", outputs=(IMAGE,))
def MaskToImage(mask: MASK):
    """Masks as grey RGB images (ComfyUI's "Convert Mask to Image")."""
    return masks.to_image(mask)


@node(category="mask", outputs=(MASK,))
def InvertMask(mask: MASK):
    """1 - mask."""
    return masks.invert(mask)


@node(category="mask", outputs=(MASK,))
def SolidMask(value: Float(0.0, 1.0) = 1.0, width: Int(1, MAX_RESOLUTION) = 512,
              height: Int(1, MAX_RESOLUTION) = 512):
    """A width x height mask of one value."""
    return masks.solid(value, width, height)


@node(category="mask", outputs=(MASK,))
def CropMask(mask: MASK, x: Int(0, MAX_RESOLUTION) = 0, y: Int(0, MAX_RESOLUTION) = 0,
             width: Int(1, MAX_RESOLUTION) = 512, height: Int(1, MAX_RESOLUTION) = 512):
    """The width x height window of the mask at (x, y), cut off at its edges."""
    return masks.crop(mask, x, y, width, height)


@node(category="mask", outputs=(MASK,))
def GrowMask(mask: MASK, expand: Int(-MAX_RESOLUTION, MAX_RESOLUTION) = 0, tapered_corners: Boolean() = True):
    """Grow the mask by `expand` pixels (negative: shrink).

    One 3x3 step at a time; tapered corners grow it diamond-shaped instead of square."""
    return masks.grow(mask, expand, tapered_corners)


@node(category="mask", outputs=(MASK,))
def FeatherMask(mask: MASK, left: Int(0, MAX_RESOLUTION) = 0, top: Int(0, MAX_RESOLUTION) = 0,
                right: Int(0, MAX_RESOLUTION) = 0, bottom: Int(0, MAX_RESOLUTION) = 0):
    """Fade the mask out linearly over that many pixels at each side."""
    return masks.feather(mask, left, top, right, bottom)


@node(category="mask", outputs=(MASK,))
def MaskComposite(destination: MASK, source: MASK, x: Int(0, MAX_RESOLUTION) = 0,
                  y: Int(0, MAX_RESOLUTION) = 0, operation: Choice(masks.COMPOSITE_OPERATIONS) = "multiply"):
    """Combine `source` into `destination` at (x, y) by an operation.

    multiply, add, subtract, or and/or/xor of the masks rounded to 0/1; the result is clamped to [0, 1]."""
    return masks.combine(destination, source, x, y, operation)


@node(category="mask", outputs=(MASK,))
def ThresholdMask(mask: MASK, value: Float(0.0, 1.0) = 0.5):
    """1 where the mask is above `value`, else 0."""
    return masks.threshold(mask, value)
