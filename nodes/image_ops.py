"""ComfyUI's everyday image nodes: scaling, empty images, invert, batches, crop, outpaint padding, masked
composite. IMAGE is NHWC float32 in [0, 1]; the maths is in sd/image/ops.py."""

from __future__ import annotations

import mlx.core as mx

from graph import IMAGE, MASK, Boolean, Choice, Float, Int, node
from nodes.latent_ops import FLIP_METHODS, ROTATIONS
from nodes.latents import MAX_RESOLUTION
from sd.image import ops
from sd.image.resize import IMAGE_METHODS

CROP_METHODS = ("disabled", "center")


def _checked(width: int, height: int) -> tuple[int, int]:
    if width < 1 or height < 1:
        raise ValueError(f"the scaled image would be {width}x{height} pixels; scale up more")
    return width, height


@node(category="image/upscaling", outputs=(IMAGE,))
def ImageScale(image: IMAGE, upscale_method: Choice(IMAGE_METHODS) = "nearest-exact",
               width: Int(0, MAX_RESOLUTION) = 512, height: Int(0, MAX_RESOLUTION) = 512,
               crop: Choice(CROP_METHODS) = "disabled"):
    """Resize images to width x height pixels (ComfyUI's "Upscale Image"). A size of 0 takes that side
    from the aspect ratio; both 0 returns the input. crop=center first cuts the image to the new aspect."""
    if width == 0 and height == 0:
        return image
    _, h, w, _ = image.shape
    width, height = ops.size_keeping_aspect(h, w, width, height)
    out = ops.scale(image, width, height, upscale_method, crop)
    mx.eval(out)
    return out


@node(category="image/upscaling", outputs=(IMAGE,))
def ImageScaleBy(image: IMAGE, upscale_method: Choice(IMAGE_METHODS) = "nearest-exact",
                 scale_by: Float(0.01, 8.0) = 1.0):
    """Resize images by a factor (each side rounded to whole pixels)."""
    _, h, w, _ = image.shape
    width, height = _checked(round(w * scale_by), round(h * scale_by))
    out = ops.scale(image, width, height, upscale_method)
    mx.eval(out)
    return out


@node(category="image/upscaling", outputs=(IMAGE,))
def ImageScaleToTotalPixels(image: IMAGE, upscale_method: Choice(IMAGE_METHODS) = "nearest-exact",
                            megapixels: Float(0.01, 16.0) = 1.0, resolution_steps: Int(1, 256) = 1):
    """Resize images to about `megapixels` x 1024² pixels, keeping the aspect ratio.

    Each side is rounded to a multiple of `resolution_steps` (an input of current ComfyUI; files from
    older versions lack it and get the default 1, which is the old behaviour)."""
    _, h, w, _ = image.shape
    width, height = _checked(*ops.size_for_megapixels(h, w, megapixels, resolution_steps))
    out = ops.scale(image, width, height, upscale_method)
    mx.eval(out)
    return out


@node(category="image", outputs=(IMAGE,))
def EmptyImage(width: Int(1, MAX_RESOLUTION) = 512, height: Int(1, MAX_RESOLUTION) = 512,
               batch_size: Int(1, 4096) = 1, color: Int(0, 0xFFFFFF) = 0):
    """A batch of images of one colour (`color` as the integer 0xRRGGBB; 0 = black)."""
    return ops.empty_image(width, height, batch_size, color)


@node(category="image", outputs=(IMAGE,))
def ImageInvert(image: IMAGE):
    """1 - image on every channel."""
    out = 1.0 - image
    mx.eval(out)
    return out


@node(category="image", outputs=(IMAGE,))
def ImageBatch(image1: IMAGE, image2: IMAGE):
    """One batch of image1 then image2.

    image2 is first resized (bilinear, centre crop) to image1's size when the sizes differ."""
    return ops.join_batches(image1, image2)


@node(category="image/transform", outputs=(IMAGE,))
def ImageCrop(image: IMAGE, width: Int(1, MAX_RESOLUTION) = 512, height: Int(1, MAX_RESOLUTION) = 512,
              x: Int(0, MAX_RESOLUTION) = 0, y: Int(0, MAX_RESOLUTION) = 0):
    """The width x height window whose top-left corner is (x, y), cut off at the image's edges."""
    return ops.crop(image, x, y, width, height)


@node(category="image", outputs=(IMAGE, MASK))
def ImagePadForOutpaint(image: IMAGE, left: Int(0, MAX_RESOLUTION) = 0, top: Int(0, MAX_RESOLUTION) = 0,
                        right: Int(0, MAX_RESOLUTION) = 0, bottom: Int(0, MAX_RESOLUTION) = 0,
                        feathering: Int(0, MAX_RESOLUTION) = 40):
    """Grow the canvas by grey margins for outpainting, with a MASK of what to paint.

    The mask is 1 on the new margins and fades out quadratically over `feathering` pixels inside the image
    along the padded sides. (ComfyUI's UI steps the margins by 8; any value works here.)"""
    return ops.pad_for_outpaint(image, left, top, right, bottom, feathering)


@node(category="image", outputs=(IMAGE,))
def ImageCompositeMasked(destination: IMAGE, source: IMAGE, x: Int(0, MAX_RESOLUTION) = 0,
                         y: Int(0, MAX_RESOLUTION) = 0, resize_source: Boolean() = False, mask: MASK = None):
    """Paste `source` onto `destination` at (x, y), blended by an optional mask.

    The mask (1 = source) is resized to the source; the source is cut off at the destination's edges;
    resize_source first scales the source to the destination's size."""
    if destination.shape[-1] != source.shape[-1]:
        raise ValueError(f"destination has {destination.shape[-1]} channels, source {source.shape[-1]}")
    return ops.composite(destination, source, x, y, mask, 1, resize_source)


@node(category="image/batch", outputs=(IMAGE,))
def RepeatImageBatch(image: IMAGE, amount: Int(1, 4096) = 1):
    """The batch repeated `amount` times."""
    out = mx.concatenate([image] * amount) if amount > 1 else image
    mx.eval(out)
    return out


@node(category="image/batch", outputs=(IMAGE,))
def ImageFromBatch(image: IMAGE, batch_index: Int(-MAX_RESOLUTION, MAX_RESOLUTION) = 0,
                   length: Int(1, 4096) = 1):
    """`length` images from position `batch_index` of the batch (negative: from the end; both cut to the
    batch). Current ComfyUI's range; older versions allowed 0-4095 only."""
    n = image.shape[0]
    start = max(0, min(n - 1, batch_index + n if batch_index < 0 else batch_index))
    out = image[start:start + min(image.shape[0] - start, length)]
    mx.eval(out)
    return out


@node(category="image/transform", outputs=(IMAGE,))
def ImageFlip(image: IMAGE, flip_method: Choice(FLIP_METHODS) = FLIP_METHODS[0]):
    """Mirror images ("x-axis: vertically" turns them upside down, "y-axis: horizontally" mirrors them)."""
    return ops.flip(image, flip_method[0])


@node(category="image/transform", outputs=(IMAGE,))
def ImageRotate(image: IMAGE, rotation: Choice(ROTATIONS) = "none"):
    """Rotate images clockwise by 90, 180 or 270 degrees."""
    turns = ROTATIONS.index(rotation)
    return ops.rotate(image, turns) if turns else image
