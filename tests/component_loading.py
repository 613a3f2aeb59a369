"""Test helper: write synthetic component weights as a real-layout .safetensors file and load one component.

Uses sd.checkpoint.load_checkpoint (the path users take) once it exists; until then a minimal stand-in that
does what the loader contract says: strip the prefix, transpose 4-D conv weights OIHW -> OHWI, strict load.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def write_component(path: Path, prefix: str, weights: dict[str, np.ndarray]) -> Path:
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path))
    return path


def load_component(path: Path, prefix: str, config_from_weights, model_class):
    raw = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    config = config_from_weights({k: v.shape for k, v in raw.items()})
    model = model_class(config)
    model.load_weights([(k, mx.array(v.transpose(0, 2, 3, 1) if v.ndim == 4 else v)) for k, v in raw.items()],
                       strict=True)
    return model
