"""SaveLatent and LoadLatent: ComfyUI's `.latent` files.

A `.latent` file is a safetensors file holding `latent_tensor` (NCHW, float, *unscaled* VAE space: what a
LATENT carries) and an empty `latent_format_version_0` tensor. Files without that marker come from
ComfyUI's first format, which stored latents multiplied by SD1's 0.18215: LoadLatent divides those by it,
as ComfyUI does. The text metadata carries the workflow (`prompt`, and sdgraph's own `sdgraph`), as in PNGs.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from graph import LATENT, String, node
from nodes.images import output_location, save_exclusive, save_folder
from nodes.paths import resolve_latent
from nodes.prefix_tokens import expand_prefix
from nodes.values import Latent

TENSOR_KEY = "latent_tensor"
VERSION_KEY = "latent_format_version_0"
OLD_FORMAT_SCALE = 0.18215  # what ComfyUI's first .latent format multiplied latents by
LATENT_CHANNELS = 4


def latent_file_bytes(samples_nhwc: np.ndarray, metadata: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    tensors = {TENSOR_KEY: np.ascontiguousarray(samples_nhwc.transpose(0, 3, 1, 2), dtype=np.float32),
               VERSION_KEY: np.zeros((0,), dtype=np.float32)}
    return save(tensors, metadata=metadata or None)


@node(category="latent", output=True, writes_files={"filename_prefix": save_folder})
def SaveLatent(samples: LATENT, filename_prefix: String() = "latents/ComfyUI", ctx=None):
    """Save latents as output/{prefix}_{counter:05}_.latent (ComfyUI's format, never overwriting).

    For LoadLatent here or in ComfyUI. The prefix takes SaveImage's tokens."""
    from graph.distributed import tagged_stem
    from nodes.png_workflow import png_text

    latent: Latent = samples
    prefix = expand_prefix(filename_prefix, ctx.run_info.get("workflow"))
    folder, name = output_location(ctx.output_dir, prefix)
    name = tagged_stem(name, ctx.run_info)
    data = latent_file_bytes(np.array(latent.samples.astype(mx.float32)), png_text(ctx.run_info))
    save_exclusive(ctx, folder, name, data, suffix=".latent")


@node(category="latent", outputs=(LATENT,), reads_files={"latent": resolve_latent})
def LoadLatent(latent: String(), ctx=None):
    """Load a `.latent` file (SaveLatent's, or ComfyUI's) from the input folder.

    'name [output]' reads the output folder. Files of ComfyUI's first format (no version marker) are
    divided by 0.18215, as ComfyUI does."""
    from sd.io.checkpoint_io import open_tensors

    path = resolve_latent(latent, ctx.folders)
    tensors = open_tensors(path)  # safetensors only in practice; never unpickles anything executable
    if TENSOR_KEY not in tensors:
        raise ValueError(f"{path.name} holds no '{TENSOR_KEY}': not a ComfyUI .latent file "
                         f"(keys: {', '.join(sorted(tensors)[:5]) or 'none'})")
    shape = tensors.shape(TENSOR_KEY)
    if len(shape) != 4 or shape[1] != LATENT_CHANNELS or 0 in shape:
        raise ValueError(f"{path.name}: '{TENSOR_KEY}' has shape {tuple(shape)}; an SD1.x latent batch is "
                         f"[batch, {LATENT_CHANNELS}, height, width]")
    array = np.asarray(tensors[TENSOR_KEY], dtype=np.float32)
    if VERSION_KEY not in tensors:
        array = array * np.float32(1.0 / OLD_FORMAT_SCALE)
    samples = mx.array(np.ascontiguousarray(array.transpose(0, 2, 3, 1)))
    mx.eval(samples)
    return Latent(samples)
