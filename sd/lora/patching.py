"""Apply LoRA patch sets to a module without touching it: the result is a new module tree that shares every
unpatched array with the base. MLX arrays are immutable, so sharing is safe; the containers (modules, lists)
are shallow-copied, which costs no array memory, and only the patched weights are new arrays.

Nothing is cached here (sd/ holds no state in modules): whoever keeps patched modules or deltas keeps them,
e.g. sdgraph's model store (nodes/models.py), keyed by recipe; `apply_loras(..., deltas=)` takes the kept
ones. Removing a LoRA (an empty or all-zero patch set) returns the base module itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from sd.lora.lora_file import LoRA, canonical_component

PatchSet = Sequence[tuple[LoRA, float]]


def patch_set_key(loras: PatchSet) -> tuple[tuple[str, float], ...]:
    """The identity of a patch set: (file fingerprint, strength) pairs in order, zero strengths dropped."""
    return tuple((lora.fingerprint, float(strength)) for lora, strength in loras if strength != 0)


def _copy_tree(value):
    """Copy modules, lists and dicts (the containers); arrays and everything else are shared."""
    if isinstance(value, nn.Module):
        new = copy.copy(value)
        for attr, attr_value in vars(new).items():
            if isinstance(attr_value, (set, list, dict)):  # e.g. the frozen-parameter set: never share state
                vars(new)[attr] = copy.copy(attr_value)
        for key in list(new.keys()):
            dict.__setitem__(new, key, _copy_tree(dict.__getitem__(new, key)))
        return new
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    return value


def _set_parameter(module: nn.Module, name: str, value: mx.array) -> None:
    *path, leaf = name.split(".")
    node = module
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(leaf) if isinstance(node, list) else leaf] = value


def apply_loras(module: nn.Module, loras: PatchSet, component: str, allow_partial: bool = False,
                deltas: Callable[[LoRA], dict[str, mx.array]] | None = None) -> nn.Module:
    """A new module equal to `module` with W' = W + sum(strength_i * delta_i) for every patched weight.

    `component` is "unet" (alias "model") or "text_encoder" (alias "clip"); strengths may be negative; zero
    strengths are skipped and an empty set returns `module` itself. The base module is never modified.
    Unmatched LoRA keys raise LoRAError unless `allow_partial` (then they are skipped with a warning).
    Every delta is relative to `module`'s weights, so chained LoRAs add up (a DoRA layer's delta is its
    re-normalised weight minus the base weight, scaled by its strength, as ComfyUI does).
    `deltas(lora)` gives a LoRA's deltas at strength 1 for `module` (default: computed now, by
    `lora.deltas(component, module, allow_partial)`): a caller that keeps deltas across strengths passes them.
    """
    component = canonical_component(component)
    active = [(lora, float(s)) for lora, s in loras if s != 0]
    if not active:
        return module
    if deltas is None:
        def deltas(lora: LoRA) -> dict[str, mx.array]:
            return lora.deltas(component, module, allow_partial)
    per_lora = [(deltas(lora), strength) for lora, strength in active]
    names = sorted({name for deltas, _ in per_lora for name in deltas})
    if not names:  # e.g. a text-encoder-only LoRA applied to the UNet
        return module
    params = dict(tree_flatten(module.parameters()))
    patched_values = {}
    for name in names:  # one weight at a time: temporaries stay one layer big
        weight = params[name]
        value = weight.astype(mx.float32)
        for deltas, strength in per_lora:
            if name in deltas:
                value = value + strength * deltas[name]
        patched_values[name] = value.astype(weight.dtype)
        mx.eval(patched_values[name])
    patched = _copy_tree(module)
    for name, value in patched_values.items():
        _set_parameter(patched, name, value)
    return patched


def apply_lora_stack(unet: nn.Module | None, text_encoder: nn.Module | None,
                     stack: Sequence[tuple[LoRA, float, float]], allow_partial: bool = False,
                     ) -> tuple[nn.Module | None, nn.Module | None]:
    """ComfyUI's LoraLoader semantics for a chain: (lora, strength_model, strength_clip) entries applied to
    the UNet and the text encoder separately; a component that is None (not loaded) is skipped."""
    new_unet = None if unet is None else apply_loras(unet, [(lo, sm) for lo, sm, _ in stack], "unet",
                                                      allow_partial)
    new_clip = None if text_encoder is None else apply_loras(
        text_encoder, [(lo, sc) for lo, _, sc in stack], "text_encoder", allow_partial)
    return new_unet, new_clip
