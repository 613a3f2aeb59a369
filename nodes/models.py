"""Build model weights from recipes (nodes/values.py) on first use, and keep them for reuse.

Only the node that needs weights asks for them (KSampler the UNet, CLIPEncode the text encoder,
VAEDecode/VAEEncode the VAE), so when those nodes are cache hits nothing is loaded. Each component
is read alone (`sd.loading.checkpoint.load_component`), base weights are shared by every patch set, and
LoRA patches are applied by `sd.lora.apply_loras`, which never modifies the base.

LOAD_COUNTS counts reads from disk per kind ("unet", "clip", "vae", "lora"): tests and
`sdgraph doctor` use it to show what a run really loaded.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from nodes.values import ClipRecipe, FileRef, LoRAPatch, ModelRecipe, VaeRecipe
from sd.runtime import switches

Log = Callable[[str], None]
LOAD_COUNTS: Counter[str] = Counter()

_LABELS = {"unet": "UNet", "clip": "text encoder", "vae": "VAE"}
_KEEP = 2  # per kind: two checkpoints (or patch sets) alternating in a sweep stay loaded


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: Any, value: Any) -> Any:
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


_BASES = _LRU(3 * _KEEP)       # (part, FileRef) -> module: all three parts of two checkpoints
_PATCHED = _LRU(2 * _KEEP)     # (part, FileRef, patches) -> module: UNet and CLIP of two patch sets
_SKELETONS = _LRU(2 * _KEEP)   # (part, FileRef) -> module with unevaluated weights (shapes only)
_LORAS = _LRU(16)              # FileRef -> parsed LoRA


def clear() -> None:
    """Drop every loaded model (e.g. between tests)."""
    for cache in (_BASES, _PATCHED, _SKELETONS, _LORAS):
        cache.items.clear()


def _base(part: str, ref: FileRef, log: Log) -> Any:
    model = _BASES.get((part, ref))
    if model is None:
        from sd.loading.checkpoint import load_component

        start = time.perf_counter()
        model = load_component(ref.path, part)
        LOAD_COUNTS[part] += 1
        log(f"loaded {_LABELS[part]} from {ref.name} ({time.perf_counter() - start:.2f} s)")
        _BASES.put((part, ref), model)
    return model


def load_lora_file(ref: FileRef) -> Any:
    """The parsed LoRA file (small: kept for reuse by file identity)."""
    lora = _LORAS.get(ref)
    if lora is None:
        from sd.lora import load_lora

        lora = _LORAS.put(ref, load_lora(ref.path))
        LOAD_COUNTS["lora"] += 1
    return lora


def _patched(part: str, component: str, ref: FileRef, patches: tuple[LoRAPatch, ...], log: Log) -> Any:
    base = _base(part, ref, log)
    if not patches:
        return base
    key = (part, ref, patches)
    model = _PATCHED.get(key)
    if model is None:
        from sd.lora import apply_loras

        start = time.perf_counter()
        loras = [(load_lora_file(p.lora), p.strength) for p in patches]
        # strict LoRAs were checked in full by LoadLoRA, which also logged any partial ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = apply_loras(base, loras, component, allow_partial=any(p.allow_partial for p in patches))
        names = ", ".join(f"{p.lora.name}@{p.strength:g}" for p in patches)
        log(f"applied LoRA {names} to the {_LABELS[part]} ({time.perf_counter() - start:.2f} s)")
        _PATCHED.put(key, model)
    return model


def unet_for(recipe: ModelRecipe, log: Log = lambda msg: None) -> Any:
    return _patched("unet", "unet", recipe.checkpoint, recipe.patches, log)


def clip_for(recipe: ClipRecipe, log: Log = lambda msg: None) -> Any:
    return _patched("clip", "text_encoder", recipe.checkpoint, recipe.patches, log)


def vae_for(recipe: VaeRecipe, log: Log = lambda msg: None) -> Any:
    return _base("vae", recipe.checkpoint, log)


def _fast(module: Any, attr: str, build: Callable[[Any], Any]) -> Any:
    """sd.accel's accelerated model for a (possibly LoRA-patched) module, built once and kept on the module.
    SDGRAPH_FAST=0 runs the plain modules instead (same results within fp rounding; for debugging)."""
    if not switches.flag("SDGRAPH_FAST"):
        return None
    kept = getattr(module, attr, None)
    # (owner, fast): a LoRA-patched copy (sd.lora's _copy_tree) inherits its base's attributes, and the
    # base's fast path would run the base's weights
    if kept is None or kept[0] is not module:
        kept = (module, build(module))
        object.__setattr__(module, attr, kept)  # a plain attribute, not a parameter of the module
    return kept[1]


def fast_unet(unet: Any) -> Any:
    """A callable like the UNet, accelerated for this device (sd/accel/compiled.py)."""
    from sd.accel.compiled import FastUNet

    return _fast(unet, "_sdgraph_fast_unet", FastUNet) or unet


def _fast_vae(vae: Any) -> Any:
    from sd.accel.compiled import FastVAE

    return _fast(vae, "_sdgraph_fast_vae", FastVAE) or vae


def vae_decoder(vae: Any) -> Callable[[Any], Any]:
    """The VAE's decode, accelerated for this device."""
    return _fast_vae(vae).decode


def vae_encoder(vae: Any) -> Callable[[Any], Any]:
    """The VAE's encode, accelerated for this device."""
    return _fast_vae(vae).encode


def skeleton(part: str, ref: FileRef) -> Any:
    """The component's module built from the file's shapes with *unevaluated* random weights: MLX is
    lazy, so this reads only the header and allocates nothing. Enough to match LoRA keys against."""
    model = _SKELETONS.get((part, ref))
    if model is not None:
        return model
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.checkpoint import PREFIXES, split_components

    tensors = open_tensors(ref.path)
    keys = split_components(tensors.keys())[part]
    if not keys:
        from sd.errors import MissingComponentError

        raise MissingComponentError(f"{ref.path}: the checkpoint has no {_LABELS[part]} weights "
                                    f"('{PREFIXES[part]}*' keys)")
    shapes = {name: tuple(tensors.shape(key)) for name, key in keys.items()}
    if part == "unet":
        from sd.loading.detect import detect_unet_config
        from sd.models.unet import UNetModel

        model = UNetModel(detect_unet_config(ref.path, shapes))
    else:
        from sd.models.clip import CLIPTextModel, clip_config_from_weights

        model = CLIPTextModel(clip_config_from_weights(shapes, ref.path))
    return _SKELETONS.put((part, ref), model)
