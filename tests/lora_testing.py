"""Shared helpers for the LoRA tests: tiny random SD1.5-layout models and LoRA files."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from reference import diffusers_unet_config as reference_unet_config
from safetensors.numpy import save_file

from sd.loading.checkpoint import load_checkpoint
from sd.synthetic import make_checkpoint

UNET_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer."


def make_tiny(tmp_path_factory) -> dict:
    """A tiny SD1.5-layout UNet and CLIP text encoder with random weights (for a module-scoped fixture)."""
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "tiny", seed=7,
                           parts=("unet", "clip"))
    checkpoint = load_checkpoint(path, dtype="float32")
    return dict(path=path, unet=checkpoint.unet, clip=checkpoint.clip)


def diffusers_unet_config(cfg) -> dict:
    return dict(reference_unet_config(cfg), sample_size=8)


def params(module) -> dict[str, mx.array]:
    return dict(tree_flatten(module.parameters()))


def torch_layout(weight: mx.array) -> np.ndarray:
    """An MLX weight as a numpy array in PyTorch layout (convs O, I, kh, kw)."""
    w = np.array(weight.astype(mx.float32))
    return w.transpose(0, 3, 1, 2) if w.ndim == 4 else w


def save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def randn(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def kohya_pair(rng, key: str, out_f: int, in_f: int, rank: int, alpha: float | None = None,
               kernel: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """kohya lora_down/lora_up (+alpha) for one layer; convs get a kh x kw down and a 1x1 up."""
    down = randn(rng, rank, in_f, *kernel) if kernel else randn(rng, rank, in_f)
    up = randn(rng, out_f, rank, 1, 1) if kernel else randn(rng, out_f, rank)
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
    return tensors


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
