"""Build model weights from recipes (nodes/values.py) on first use, and keep them for reuse in one store.

Only the node that needs weights asks for them (KSampler the UNet, CLIPEncode the text encoder,
VAEDecode/VAEEncode the VAE), so when those nodes are cache hits nothing is loaded. Each component
is read alone (`sd.loading.checkpoint.load_component`), base weights are shared by every patch set, and
weight patches (LoRAs, merges) are applied in order by `sd.lora.patching.apply_patches`, which never modifies
the base; hypernetworks are attached to the patched UNet's attention by `sd.hypernetwork`.

Everything built is an entry of STORE (`sd.loading.store.ModelStore`: least recently used out once the arrays
held pass a byte budget, arrays shared between entries counted once), keyed by its recipe:

    ("unet" | "clip" | "vae", checkpoint identity)                  a component's weights
    ("vae-file", VAE file identity)                                 a standalone VAE file's (VAELoader)
    ("unet" | "clip", checkpoint identity, patches)                 the same, patched (LoRAs, merges, and
                                                                    for the UNet hypernetworks)
    ("lora", LoRA identity)                                         a parsed LoRA file
    ("hypernetwork", file identity)                                 a parsed hypernetwork file
    ("deltas", LoRA identity, component, allow_partial, <base key>) its fp32 deltas for that base (~1 GB full
                                                                    size; a strength change reuses them)
    ("skeleton", "unet" | "clip", checkpoint identity)              shapes only (unevaluated: weighs nothing)
    ("upscale", file identity)                                      an upscale model (ESRGAN, Compact)
    ("controlnet", file identity, <diff base>)                      a ControlNet (a diff ControlNet's base:
                                                                    the UNet's checkpoint identity + patches)
    ("fast" | "fast-vae" | "fast-upscale", <a model's key>)         sd.accel's accelerated wrapper of it
    ("fast-controlnet", <a ControlNet's key>)                       (the same for a ControlNet)

An identity is the engine's fingerprint of the file (FileRef.identity), patches are in order: (LoRA identity,
strength, allow_partial), ("merge", the other recipe's key, rule), ("hypernetwork", identity, strength). A
merge's other model is itself an entry (its weights with its own patches), built first. An accelerated
wrapper depends on its model's entry: it leaves with it.

LOAD_COUNTS counts reads from disk per kind ("unet", "clip", "vae", "lora", "upscale", "hypernetwork"): tests
and `sdgraph doctor` use it to show what a run really loaded.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from nodes.values import (
    ClipRecipe,
    FileRef,
    HypernetworkPatch,
    LoRAPatch,
    MergePatch,
    ModelRecipe,
    UpscaleModelRecipe,
    VaeRecipe,
)
from sd.loading.store import ModelStore
from sd.runtime import switches

Log = Callable[[str], None]
LOAD_COUNTS: Counter[str] = Counter()
STORE = ModelStore()  # the budget: SDGRAPH_MODEL_CACHE_BYTES, else half the memory (sd/loading/store.py)

_LABELS = {"unet": "UNet", "clip": "text encoder", "vae": "VAE"}


def clear() -> None:
    """Drop every loaded model (e.g. between tests)."""
    STORE.clear()


def _patch_key(p: LoRAPatch | MergePatch | HypernetworkPatch) -> tuple:
    if isinstance(p, LoRAPatch):
        return (p.lora.identity, p.strength, p.allow_partial)
    if isinstance(p, MergePatch):
        return ("merge", p.other.checkpoint.identity, _patches_key(p.other.weight_patches), p.rule)
    return ("hypernetwork", p.hypernetwork.identity, p.strength)


def _patches_key(patches: tuple) -> tuple:
    return tuple(_patch_key(p) for p in patches)


def _base(part: str, ref: FileRef, log: Log) -> Any:
    def build() -> Any:
        from sd.loading.checkpoint import load_component

        start = time.perf_counter()
        model = load_component(ref.path, part)
        LOAD_COUNTS[part] += 1
        log(f"loaded {_LABELS[part]} from {ref.name} ({time.perf_counter() - start:.2f} s)")
        return model

    return STORE.get((part, ref.identity), build)


def load_lora_file(ref: FileRef) -> Any:
    """The parsed LoRA file (kept for reuse by file identity)."""
    def build() -> Any:
        from sd.lora import load_lora

        LOAD_COUNTS["lora"] += 1
        return load_lora(ref.path, fingerprint=ref.identity)

    return STORE.get(("lora", ref.identity), build)


def _patched(part: str, component: str, ref: FileRef, patches: tuple, log: Log) -> Any:
    """The component with its weight patches (LoRAs and merges) applied in order; hypernetworks aside."""
    base = _base(part, ref, log)
    if not patches:
        return base

    lora_patches = [p for p in patches if isinstance(p, LoRAPatch)]
    allow_partial = any(p.allow_partial for p in lora_patches)

    def deltas(lora: Any) -> dict:
        # computing them costs ~1-7 s of numpy on the CPU for a full-size LoRA (a GPU's whole sampling or
        # more): kept, so a strength sweep computes them once
        key = ("deltas", lora.fingerprint, component, allow_partial, (part, ref.identity))
        return STORE.get(key, lambda: lora.deltas(component, base, allow_partial))

    def build() -> Any:
        from sd.lora.patching import MergeStep, apply_patches

        start = time.perf_counter()
        steps = []
        for p in patches:
            if isinstance(p, LoRAPatch):
                steps.append((load_lora_file(p.lora), p.strength))
            else:  # the other model's weights with its own patches, built (and kept) first
                other = _patched(part, component, p.other.checkpoint, p.other.weight_patches, log)
                steps.append(MergeStep(other, p.rule))
        # strict LoRAs were checked in full by LoadLoRA, which also logged any partial ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = apply_patches(base, steps, component, allow_partial=allow_partial, deltas=deltas)
        log(f"applied {describe(patches)} to the {_LABELS[part]} ({time.perf_counter() - start:.2f} s)")
        return model

    return STORE.get((part, ref.identity, _patches_key(patches)), build)


def describe(patches: tuple) -> str:
    """`LoRA a.safetensors@0.8, merge with b.safetensors, ...` for logs and messages."""
    parts = []
    for p in patches:
        if isinstance(p, LoRAPatch):
            parts.append(f"LoRA {p.lora.name}@{p.strength:g}")
        elif isinstance(p, MergePatch):
            parts.append(f"merge with {p.other.checkpoint.name}" + (" (patched)" if p.other.patches else ""))
        else:
            parts.append(f"hypernetwork {p.hypernetwork.name}@{p.strength:g}")
    return ", ".join(parts)


def load_hypernetwork_file(ref: FileRef) -> Any:
    """The parsed hypernetwork file (kept for reuse by file identity)."""
    def build() -> Any:
        from sd.hypernetwork import load_hypernetwork

        LOAD_COUNTS["hypernetwork"] += 1
        return load_hypernetwork(ref.path)

    return STORE.get(("hypernetwork", ref.identity), build)


def unet_for(recipe: ModelRecipe, log: Log = lambda msg: None) -> Any:
    weights = _patched("unet", "unet", recipe.checkpoint, recipe.weight_patches, log)
    hypernetworks = [p for p in recipe.patches if isinstance(p, HypernetworkPatch)]
    if not hypernetworks:
        return weights

    def build() -> Any:
        from sd.hypernetwork import attach_hypernetworks

        loaded = [(load_hypernetwork_file(p.hypernetwork), p.strength) for p in hypernetworks]
        model = attach_hypernetworks(weights, loaded)
        log(f"attached {describe(tuple(hypernetworks))} to the UNet's attention")
        return model

    return STORE.get(("unet", recipe.checkpoint.identity, _patches_key(recipe.patches)), build)


def clip_for(recipe: ClipRecipe, log: Log = lambda msg: None) -> Any:
    return _patched("clip", "text_encoder", recipe.checkpoint, recipe.patches, log)


def vae_for(recipe: VaeRecipe, log: Log = lambda msg: None) -> Any:
    if recipe.source == "checkpoint":
        return _base("vae", recipe.checkpoint, log)
    ref = recipe.checkpoint

    def build() -> Any:
        from sd.loading.vae_file import load_vae_file

        start = time.perf_counter()
        model = load_vae_file(ref.path)
        LOAD_COUNTS["vae"] += 1
        log(f"loaded VAE from {ref.name} ({time.perf_counter() - start:.2f} s)")
        return model

    return STORE.get(("vae-file", ref.identity), build)


def _fast(kind: str, module: Any, build: Callable[[Any], Any]) -> Any:
    """sd.accel's accelerated model for a (possibly LoRA-patched) module from the store, built once and kept
    as the store's entry (kind, the module's key), which leaves the store with the module's. A module the
    store does not hold gets a wrapper that is not kept. SDGRAPH_FAST=0 runs the plain modules instead (same
    results within fp rounding; for debugging)."""
    if not switches.flag("SDGRAPH_FAST"):
        return None
    key: Hashable | None = STORE.key_of(module)
    if key is None:
        return build(module)
    return STORE.get((kind, key), lambda: build(module), parent=key)


def fast_unet(unet: Any) -> Any:
    """A callable like the UNet, accelerated for this device (sd/accel/compiled.py)."""
    from sd.accel.compiled import FastUNet

    return _fast("fast", unet, FastUNet) or unet


def _fast_vae(vae: Any) -> Any:
    from sd.accel.compiled import FastVAE

    return _fast("fast-vae", vae, FastVAE) or vae


def vae_decoder(vae: Any) -> Callable[[Any], Any]:
    """The VAE's decode, accelerated for this device."""
    return _fast_vae(vae).decode


def vae_encoder(vae: Any) -> Callable[[Any], Any]:
    """The VAE's encode, accelerated for this device."""
    return _fast_vae(vae).encode


def fast_upscaler(model: Any) -> Any:
    """A callable like the upscale model, accelerated for this device (sd/accel/compiled.py)."""
    from sd.accel.compiled import FastUpscaler

    return _fast("fast-upscale", model, FastUpscaler) or model


def skeleton(part: str, ref: FileRef) -> Any:
    """The component's module built from the file's shapes with unevaluated weights (reads the header only):
    enough to match LoRA keys against. Stored unweighed: its arrays are never allocated."""
    from sd.loading.checkpoint import build_skeleton

    return STORE.get(("skeleton", part, ref.identity), lambda: build_skeleton(ref.path, part), weigh=False)


def upscale_model_for(recipe: UpscaleModelRecipe, log: Log = lambda msg: None) -> Any:
    """The upscale model's MLX module (sd/loading/upscale_models.py), kept for reuse by file identity."""
    def build() -> Any:
        from sd.loading.upscale_models import load_upscale_model

        start = time.perf_counter()
        model = load_upscale_model(recipe.file.path)
        LOAD_COUNTS["upscale"] += 1
        log(f"loaded upscale model {recipe.file.name} ({time.perf_counter() - start:.2f} s)")
        return model

    return STORE.get(("upscale", recipe.file.identity), build)


def controlnet_for(recipe: Any, log: Log = lambda msg: None) -> Any:
    """The ControlNet (or T2I-Adapter) of a CONTROL_NET recipe (nodes/controlnet.py), kept by file identity;
    a diff ControlNet also by the UNet (with its patches) whose weights it adds."""
    base = recipe.diff_model
    base_key = None if base is None else (base.checkpoint.identity, _patches_key(base.patches))

    def build() -> Any:
        from mlx.utils import tree_flatten

        from sd.accel.precision import default_dtype
        from sd.loading.controlnet_file import describe, load_controlnet

        start = time.perf_counter()
        unet_weights = None if base is None else dict(tree_flatten(unet_for(base, log).parameters()))
        model = load_controlnet(recipe.file.path, default_dtype("unet"), unet_weights)
        LOAD_COUNTS["controlnet"] += 1
        log(f"loaded {describe(model)} from {recipe.file.name} ({time.perf_counter() - start:.2f} s)")
        return model

    return STORE.get(("controlnet", recipe.file.identity, base_key), build)


def fast_controlnet(net: Any) -> Any:
    """A callable like the ControlNet, accelerated for this device (sd/accel/compiled.py)."""
    from sd.accel.compiled import FastControlNet

    return _fast("fast-controlnet", net, FastControlNet) or net
