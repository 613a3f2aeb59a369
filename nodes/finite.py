"""Non-finite values (NaN/Inf) are an error of the node that made them, not a black image with exit 0.

Nodes call `check_finite` on what they produce; where the values are not finite, the message says which
weights are to blame when that can be known: the checkpoint's own tensors, or the model after its LoRAs.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from nodes import models


class NonFinite(ValueError):
    """A node produced NaN or Inf values."""


def check_finite(array: mx.array, what: str, recipe: Any = None, part: str | None = None) -> None:
    if bool(mx.all(mx.isfinite(array)).item()):
        return
    blame = _blame(recipe, part) if recipe is not None and part is not None else None
    raise NonFinite(f"{what} contain NaN or Inf values" + (f": {blame}" if blame else
                                                           " (the inputs or weights overflowed)"))


def _first_non_finite(module: Any) -> str | None:
    for name, value in tree_flatten(module.parameters()):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating) and \
                not bool(mx.all(mx.isfinite(value)).item()):
            return name
    return None


def _blame(recipe: Any, part: str) -> str | None:
    label = {"unet": "UNet", "clip": "text encoder", "vae": "VAE"}[part]
    if part == "vae":  # a checkpoint's VAE or a standalone VAE file's
        base = models.vae_for(recipe)
    else:
        base = models._base(part, recipe.checkpoint, lambda msg: None)
    name = _first_non_finite(base)
    if name is not None:
        kind = "VAE file" if getattr(recipe, "source", "checkpoint") == "vae_file" else "checkpoint"
        return f"the {kind} {recipe.checkpoint.path} has non-finite {label} weights ('{name}')"
    patches = getattr(recipe, "weight_patches", ())
    if patches:
        patched = models._patched(part, "unet" if part == "unet" else "text_encoder", recipe.checkpoint,
                                  patches, lambda msg: None)
        name = _first_non_finite(patched)
        if name is not None:
            files = ", ".join(dict.fromkeys(str(_patch_file(p)) for p in patches))
            return (f"the {label} weights are non-finite after applying {models.describe(patches)} ({files}; "
                    f"first '{name}')")
    return None


def _patch_file(patch: Any):
    """The file a weight patch comes from (a LoRA, or the other checkpoint of a merge)."""
    if hasattr(patch, "lora"):
        return patch.lora.path
    return patch.other.checkpoint.path
