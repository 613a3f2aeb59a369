"""Test helper: write synthetic component weights as a user would have them (a real-layout .safetensors or a
torch.save'd .ckpt with a 'state_dict' wrapper), and load them through sd.loading.checkpoint like users do
(reference.read_state reads the same file back as torch tensors for the reference models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from sd.loading.checkpoint import load_component as sd_load_component

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def write_component(path: Path, prefix: str, weights: dict[str, np.ndarray]) -> Path:
    tensors = {prefix + k: np.ascontiguousarray(v) for k, v in weights.items()}
    if path.suffix == ".ckpt":
        state = {k: torch.from_numpy(v) for k, v in tensors.items()}
        torch.save({"state_dict": state, "global_step": 1}, path)
    else:
        save_file(tensors, str(path))
    return path



def load_component(path: Path, part: str):
    """Our model for one part ("vae" or "clip") of the file, in float32."""
    return sd_load_component(path, part, dtype="float32")
