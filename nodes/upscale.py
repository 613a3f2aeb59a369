"""UpscaleModelLoader and ImageUpscaleWithModel: pixel-space upscaling with ESRGAN-family models (ComfyUI's
comfy_extras/nodes_upscale_model.py). The model code is sd/models/esrgan.py and srvgg.py, the tiling
sd/image/upscale.py."""

from __future__ import annotations

import mlx.core as mx

from graph import IMAGE, String, node, socket_type
from nodes import models
from nodes.finite import check_finite
from nodes.paths import resolve_upscale_model
from nodes.values import FileRef, UpscaleModelRecipe

UPSCALE_MODEL = socket_type("UPSCALE_MODEL")


@node(category="loaders", outputs=(UPSCALE_MODEL,), reads_files={"model_name": resolve_upscale_model})
def UpscaleModelLoader(model_name: String(), ctx=None):
    """Load an upscale model from models/upscale_models: ESRGAN (old ESRGAN, BSRGAN and Real-ESRGAN key
    layouts; 1x/2x/4x/8x, Real-ESRGAN x2plus/x1 included) or Real-ESRGAN Compact, `.pth`/`.pt` (read safely)
    or `.safetensors`. The architecture is read off the file's shapes; a file of another kind fails here."""
    from sd.loading.upscale_models import describe, inspect_upscale_model

    ref = FileRef.of(resolve_upscale_model(model_name, ctx.folders), ctx.fingerprint)
    config = inspect_upscale_model(ref.path)  # header only: a wrong file fails here, weights load on use
    ctx.log(f"upscale model {ref.name}: {describe(config)}")
    return UpscaleModelRecipe(ref)


@node(category="image/upscaling", outputs=(IMAGE,))
def ImageUpscaleWithModel(upscale_model: UPSCALE_MODEL, image: IMAGE, ctx=None):
    """Upscale images with an upscale model, in 512-pixel tiles overlapping by 32 (blended as ComfyUI blends;
    halved on out-of-memory errors, down to 128). The output size is the model's scale times the input's."""
    from sd.image.upscale import upscale_image

    model = models.upscale_model_for(upscale_model, ctx.log)
    if model.image_channels != image.shape[-1]:
        raise ValueError(f"{upscale_model.file.name} upscales {model.image_channels}-channel images; "
                         f"the image has {image.shape[-1]} channels")
    model = models.fast_upscaler(model)
    out = upscale_image(model, image.astype(mx.float32), progress=ctx.progress, log=ctx.log)
    mx.eval(out)
    check_finite(out, f"the images upscaled by {upscale_model.file.name}")
    return out
