"""The image, latent and mask nodes declare ComfyUI's inputs: names in ComfyUI's order, defaults, ranges and
outputs, transcribed here from ComfyUI's node definitions (current versions: nodes.py, comfy_extras/
nodes_mask.py, nodes_images.py, nodes_latent.py, nodes_post_processing.py); and `sdgraph nodes` lists them."""

from __future__ import annotations

import pytest
from sd_nodes_testing import run_cli

from graph.declare import get_spec

MAX = 16384
SCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LATENT_SCALE = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]
FLIPS = ["x-axis: vertically", "y-axis: horizontally"]
IMAGE, X, Y = ("image", None, None), ("x", 0, (0, MAX)), ("y", 0, (0, MAX))
W, H = ("width", 512, (1, MAX)), ("height", 512, (1, MAX))
SAMPLES, MASK_IN = ("samples", None, None), ("mask", None, None)
# name: ([(input, default or None for a link, (min, max) or choices or None)], outputs)
COMFY = {
    "ImageScale": ([IMAGE,
                    ("upscale_method", "nearest-exact", SCALE),
                    ("width", 512, (0, MAX)), ("height", 512, (0, MAX)),
                    ("crop", "disabled", ["disabled", "center"])],
                   ["IMAGE"]),
    "ImageScaleBy": ([IMAGE,
                      ("upscale_method", "nearest-exact", SCALE),
                      ("scale_by", 1.0, (0.01, 8.0))], ["IMAGE"]),
    "ImageScaleToTotalPixels": ([IMAGE, ("upscale_method", "nearest-exact", None),
                                 ("megapixels", 1.0, (0.01, 16.0)), ("resolution_steps", 1, (1, 256))],
                                ["IMAGE"]),
    "EmptyImage": ([W, H, ("batch_size", 1, (1, 4096)),
                    ("color", 0, (0, 0xFFFFFF))], ["IMAGE"]),
    "ImageInvert": ([IMAGE], ["IMAGE"]),
    "ImageBatch": ([("image1", None, None), ("image2", None, None)], ["IMAGE"]),
    "ImageCrop": ([IMAGE, W, H, X,
                   Y], ["IMAGE"]),
    "ImagePadForOutpaint": ([IMAGE, ("left", 0, (0, MAX)), ("top", 0, (0, MAX)),
                             ("right", 0, (0, MAX)), ("bottom", 0, (0, MAX)), ("feathering", 40, (0, MAX))],
                            ["IMAGE", "MASK"]),
    "ImageCompositeMasked": ([("destination", None, None), ("source", None, None), X,
                              Y, ("resize_source", False, None), MASK_IN], ["IMAGE"]),
    "RepeatImageBatch": ([IMAGE, ("amount", 1, (1, 4096))], ["IMAGE"]),
    "ImageFromBatch": ([IMAGE, ("batch_index", 0, (-MAX, MAX)), ("length", 1, (1, 4096))],
                       ["IMAGE"]),
    "ImageFlip": ([IMAGE, ("flip_method", "x-axis: vertically", None)], ["IMAGE"]),
    "ImageRotate": ([IMAGE,
                     ("rotation", "none", ROTATIONS)], ["IMAGE"]),
    "LatentUpscaleBy": ([SAMPLES,
                         ("upscale_method", "nearest-exact", LATENT_SCALE),
                         ("scale_by", 1.5, (0.01, 8.0))], ["LATENT"]),
    "RepeatLatentBatch": ([SAMPLES, ("amount", 1, (1, 64))], ["LATENT"]),
    "LatentFromBatch": ([SAMPLES, ("batch_index", 0, (0, 63)), ("length", 1, (1, 64))], ["LATENT"]),
    "LatentComposite": ([("samples_to", None, None), ("samples_from", None, None), X,
                         Y, ("feather", 0, (0, MAX))], ["LATENT"]),
    "LatentCompositeMasked": ([("destination", None, None), ("source", None, None), X,
                               Y, ("resize_source", False, None), MASK_IN],
                              ["LATENT"]),
    "LatentBlend": ([("samples1", None, None), ("samples2", None, None), ("blend_factor", 0.5, (0.0, 1.0))],
                    ["LATENT"]),
    "LatentCrop": ([SAMPLES, ("width", 512, (64, MAX)), ("height", 512, (64, MAX)),
                    X, Y], ["LATENT"]),
    "LatentFlip": ([SAMPLES,
                    ("flip_method", "x-axis: vertically", FLIPS)], ["LATENT"]),
    "LatentRotate": ([SAMPLES,
                      ("rotation", "none", ROTATIONS)], ["LATENT"]),
    "LatentBatch": ([("samples1", None, None), ("samples2", None, None)], ["LATENT"]),
    "LatentBatchSeedBehavior": ([SAMPLES, ("seed_behavior", "fixed", ["random", "fixed"])],
                                ["LATENT"]),
    "LatentAdd": ([("samples1", None, None), ("samples2", None, None)], ["LATENT"]),
    "LatentSubtract": ([("samples1", None, None), ("samples2", None, None)], ["LATENT"]),
    "LatentMultiply": ([SAMPLES, ("multiplier", 1.0, (-10.0, 10.0))], ["LATENT"]),
    "LoadImageMask": ([IMAGE, ("channel", "alpha", ["alpha", "red", "green", "blue"])], ["MASK"]),
    "ImageToMask": ([IMAGE, ("channel", "red", ["red", "green", "blue", "alpha"])], ["MASK"]),
    "ImageColorToMask": ([IMAGE, ("color", 0, (0, 0xFFFFFF))], ["MASK"]),
    "MaskToImage": ([MASK_IN], ["IMAGE"]),
    "InvertMask": ([MASK_IN], ["MASK"]),
    "SolidMask": ([("value", 1.0, (0.0, 1.0)), W, H], ["MASK"]),
    "CropMask": ([MASK_IN, X, Y, ("width", 512, (1, MAX)),
                  ("height", 512, (1, MAX))], ["MASK"]),
    "GrowMask": ([MASK_IN, ("expand", 0, (-MAX, MAX)), ("tapered_corners", True, None)], ["MASK"]),
    "FeatherMask": ([MASK_IN, ("left", 0, (0, MAX)), ("top", 0, (0, MAX)), ("right", 0, (0, MAX)),
                     ("bottom", 0, (0, MAX))], ["MASK"]),
    "MaskComposite": ([("destination", None, None), ("source", None, None), X, Y,
                       ("operation", "multiply", ["multiply", "add", "subtract", "and", "or", "xor"])],
                      ["MASK"]),
    "ThresholdMask": ([MASK_IN, ("value", 0.5, (0.0, 1.0))], ["MASK"]),
}


@pytest.mark.parametrize("name", sorted(COMFY))
def test_inputs_follow_comfyui(name):
    spec = get_spec(name)
    assert spec is not None, name
    inputs, outputs = COMFY[name]
    assert list(spec.inputs) == [i[0] for i in inputs]
    for input_name, default, constraint in inputs:
        ours = spec.inputs[input_name]
        if default is not None:
            assert ours.default == default, input_name
        if isinstance(constraint, tuple):
            assert (ours.type.min, ours.type.max) == constraint, input_name
        elif isinstance(constraint, list):
            assert list(ours.type.options) == constraint, input_name
    assert [o.type.name for o in spec.outputs] == outputs
    if name.endswith("CompositeMasked"):
        assert not spec.inputs["mask"].required


def test_sdgraph_nodes_lists_them_with_their_inputs():
    listing = run_cli("nodes")
    assert listing.rc == 0
    for name, (inputs, _) in COMFY.items():
        assert name in listing.out
        detail = run_cli("nodes", name)
        assert detail.rc == 0 and all(i[0] in detail.out for i in inputs), name
