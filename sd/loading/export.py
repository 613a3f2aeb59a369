"""Modules back to a single-file checkpoint in the original LDM layout: the inverse of
sd/loading/checkpoint.py.

Keys get their component prefix back (`model.diffusion_model.`, `cond_stage_model.transformer.`,
`first_stage_model.`), convs go back to PyTorch's OIHW, and the CLIP `position_ids` buffer is written as real
SD1.x files carry it (int64). Weights keep their dtype, except bfloat16 (numpy has none), written as float32,
which holds it exactly. What is written loads back to the same modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from sd.io.safetensors_write import write_safetensors
from sd.loading.checkpoint import PREFIXES

POSITION_IDS = "text_model.embeddings.position_ids"


def _entries(part: str, module) -> Iterator[tuple[str, mx.array]]:
    for name, value in tree_flatten(module.parameters()):
        yield PREFIXES[part] + name, value


def _numpy(array: mx.array) -> np.ndarray:
    if array.dtype == mx.bfloat16:
        array = array.astype(mx.float32)
    out = np.array(array)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if out.ndim == 4 else out


def _file_dtype(array: mx.array) -> np.dtype:
    return np.dtype("float32") if array.dtype == mx.bfloat16 else np.dtype(str(array.dtype).split(".")[-1])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape)


def save_checkpoint(path: str | Path, unet=None, clip=None, vae=None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write the given modules (any may be None) as one LDM-layout `.safetensors` file at `path`."""
    arrays: dict[str, mx.array] = {}
    for part, module in (("unet", unet), ("clip", clip), ("vae", vae)):
        if module is not None:
            arrays.update(_entries(part, module))
    shapes = {key: (_torch_shape(tuple(a.shape)), _file_dtype(a)) for key, a in arrays.items()}
    if clip is not None:
        positions = clip.config.max_positions if hasattr(clip, "config") else None
        if positions:
            shapes[PREFIXES["clip"] + POSITION_IDS] = ((1, positions), np.dtype("int64"))

    def produce(key: str) -> np.ndarray:
        if key.endswith(POSITION_IDS):
            return np.arange(shapes[key][0][1], dtype=np.int64)[None]
        return _numpy(arrays[key])

    write_safetensors(path, shapes, produce, metadata)
