"""Apply weight patches (LoRAs, and other models' weights merged in) to a module without touching it: the
result is a new module tree that shares every unpatched array with the base. MLX arrays are immutable, so
sharing is safe; the containers (modules, lists) are shallow-copied, which costs no array memory, and only
the patched weights are new arrays.

Nothing is cached here (sd/ holds no state in modules): whoever keeps patched modules or deltas keeps them,
e.g. sdgraph's model store (nodes/models.py), keyed by recipe; `apply_loras(..., deltas=)` takes the kept
ones. Removing a LoRA (an empty or all-zero patch set) returns the base module itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from sd.lora.lora_file import LoRA, canonical_component
from sd.merge.rules import MergeRule

PatchSet = Sequence[tuple[LoRA, float]]


@dataclass(frozen=True)
class MergeStep:
    """Another module's weights merged in, ComfyUI's `add_patches` of a model's key patches: for each weight
    name `rule.strengths(name)` gives (strength_patch, strength_model) and W <- strength_model * W +
    strength_patch * other[name]. A name `other` lacks is left alone; one whose shape differs is only scaled
    by strength_model, not merged (ComfyUI: "SHAPE MISMATCH ... WEIGHT NOT MERGED"), e.g. the 9-channel
    input conv of an inpainting UNet merged with a 4-channel one. `other` holds *its* patches already."""

    other: nn.Module
    rule: MergeRule


Step = tuple[LoRA, float] | MergeStep


def patch_set_key(loras: PatchSet) -> tuple[tuple[str, float], ...]:
    """The identity of a patch set: (file fingerprint, strength) pairs in order, zero strengths dropped."""
    return tuple((lora.fingerprint, float(strength)) for lora, strength in loras if strength != 0)


def copy_tree(value):
    """Copy modules, lists and dicts (the containers); arrays and everything else are shared."""
    if isinstance(value, nn.Module):
        new = copy.copy(value)
        for attr, attr_value in vars(new).items():
            if isinstance(attr_value, (set, list, dict)):  # e.g. the frozen-parameter set: never share state
                vars(new)[attr] = copy.copy(attr_value)
        for key in list(new.keys()):
            dict.__setitem__(new, key, copy_tree(dict.__getitem__(new, key)))
        return new
    if isinstance(value, list):
        return [copy_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: copy_tree(v) for k, v in value.items()}
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
    return apply_patches(module, loras, component, allow_partial, deltas)


def apply_patches(module: nn.Module, steps: Sequence[Step], component: str, allow_partial: bool = False,
                  deltas: Callable[[LoRA], dict[str, mx.array]] | None = None) -> nn.Module:
    """`apply_loras` for a chain of LoRAs and merges, applied in order to each weight (in fp32, cast back to
    the weight's dtype once), as ComfyUI's `calculate_weight` walks a key's patch list: a LoRA after a merge
    adds its delta to the merged weight, a merge after a LoRA scales the LoRA'd weight. LoRA deltas are
    computed against `module` (for plain LoRA/LoHa/LoKr they do not depend on it; a DoRA layer after a merge
    is re-normalised against the base weight, where ComfyUI takes the merged one)."""
    component = canonical_component(component)
    active = [s for s in steps if isinstance(s, MergeStep) or s[1] != 0]
    if not active:
        return module
    if deltas is None:
        def deltas(lora: LoRA) -> dict[str, mx.array]:
            return lora.deltas(component, module, allow_partial)
    params = dict(tree_flatten(module.parameters()))
    resolved = []  # (deltas, strength) for a LoRA; (the step, other's parameters) for a merge
    names: set[str] = set()
    for step in active:
        if isinstance(step, MergeStep):
            other = dict(tree_flatten(step.other.parameters()))
            resolved.append((step, other))
            names.update(n for n in params if n in other and step.rule.strengths(n) is not None)
        else:
            lora_deltas = deltas(step[0])
            resolved.append((lora_deltas, float(step[1])))
            names.update(lora_deltas)
    if not names:  # e.g. a text-encoder-only LoRA applied to the UNet
        return module
    patched_values = {}
    for name in sorted(names):  # one weight at a time: temporaries stay one layer big
        weight = params[name]
        value = weight.astype(mx.float32)
        for first, second in resolved:
            if isinstance(first, MergeStep):
                value = _merged(value, name, first.rule, second)
            elif name in first:
                value = value + second * first[name]
        patched_values[name] = value.astype(weight.dtype)
        mx.eval(patched_values[name])
    patched = copy_tree(module)
    for name, value in patched_values.items():
        _set_parameter(patched, name, value)
    return patched


def _merged(value: mx.array, name: str, rule: MergeRule, other: dict[str, mx.array]) -> mx.array:
    strengths = rule.strengths(name)
    if strengths is None or name not in other:
        return value
    strength_patch, strength_model = strengths
    if strength_model != 1.0:
        value = value * strength_model  # before the shape check, as ComfyUI: a mismatched weight is scaled
    theirs = other[name]
    if strength_patch != 0.0 and tuple(theirs.shape) == tuple(value.shape):
        value = value + strength_patch * theirs.astype(mx.float32)
    return value


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
