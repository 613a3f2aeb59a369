"""An immutable, parsed LoRA file: matches its layers to a model and computes their deltas.

Deltas are computed on each call and kept by no one here: a full-size rank-32 LoRA's deltas take ~1-1.4 GB in
fp32, which only a store with a byte budget should hold. sdgraph's model store (nodes/models.py) keeps them as
entries it accounts for, since computing them (numpy, on the CPU: measured 0.8 s for a mid-size UNet, 2-7 s
full size) is cheap next to CPU sampling but not next to a GPU's."""

from __future__ import annotations

import hashlib
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from sd.errors import LoRAError
from sd.lora.deltas import compute_delta, delta_shape, dora_delta, dora_scale_fits, fits, to_mlx_layout
from sd.lora.keymap import ModuleIndex, build_index, torch_shape
from sd.lora.reader import TEXT_ENCODER, UNET, LoRAModule, ParsedLoRA, parse_lora, read_tensors
from sd.lora.report import ComponentCoverage, CoverageReport, describe_unmatched

COMPONENTS = (UNET, TEXT_ENCODER)
_COMPONENT_ALIASES = {"clip": TEXT_ENCODER, "model": UNET}


def canonical_component(component: str) -> str:
    component = _COMPONENT_ALIASES.get(component, component)
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS} (or 'model'/'clip'), got {component!r}")
    return component


def file_fingerprint(path: str | Path) -> str:
    """Content hash of the file (plus its size), so a re-downloaded file under the same name is a new LoRA."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return f"{os.path.getsize(path)}-{digest.hexdigest()[:32]}"


class _ModelCache:
    """Per-model cached values, keyed by the model object's identity (guarded by a weak reference)."""

    def __init__(self, size: int = 4):
        self._entries: OrderedDict[tuple, tuple[weakref.ref, object]] = OrderedDict()
        self._size = size

    def get(self, model: nn.Module, key: tuple):
        entry = self._entries.get((id(model), *key))
        if entry is None or entry[0]() is not model:
            return None
        self._entries.move_to_end((id(model), *key))
        return entry[1]

    def put(self, model: nn.Module, key: tuple, value) -> None:
        self._entries[(id(model), *key)] = (weakref.ref(model), value)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class LoRA:
    """A parsed LoRA file. Immutable; layer matches are computed on first use per model and remembered."""

    def __init__(self, path: str | Path, parsed: ParsedLoRA, fingerprint: str):
        self._path = str(path)
        self._fingerprint = fingerprint
        self._parsed = parsed
        self._indexes = _ModelCache()  # layer matches per model: small (no arrays), saves re-matching

    @property
    def path(self) -> str:
        return self._path

    @property
    def fingerprint(self) -> str:
        """Identifies the file's content: equal fingerprints, equal LoRAs (used in patch-set cache keys)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"LoRA({Path(self.path).name!r}, {len(self._parsed.modules)} layers)"

    def layers(self, component: str) -> tuple[LoRAModule, ...]:
        component = canonical_component(component)
        return tuple(m for m in self._parsed.modules if m.component == component)

    def _match(self, component: str, module: nn.Module,
               ) -> tuple[dict[str, list[LoRAModule]], ComponentCoverage]:
        """Our module name -> the LoRA layers that patch it, and the coverage of this component."""
        cached = self._indexes.get(module, (component,))
        if cached is not None:
            return cached
        shapes = {name: tuple(p.shape) for name, p in tree_flatten(module.parameters())}
        index = build_index(shapes, component)
        matches: dict[str, list[LoRAModule]] = {}
        unmatched = []
        layers = self.layers(component)
        for layer in layers:
            target = _resolve(index, layer)
            if target is None:
                unmatched.append(layer.key)
                continue
            weight_shape, shape = index.shapes[target], delta_shape(layer)
            if not fits(shape, weight_shape) or not dora_scale_fits(layer, weight_shape):
                unmatched.append(f"{layer.key} (delta {'x'.join(map(str, shape))} does not fit "
                                 f"{target} {'x'.join(map(str, weight_shape))})")
                continue
            matches.setdefault(target, []).append(layer)
        coverage = ComponentCoverage(component, len(layers) - len(unmatched), len(layers), tuple(unmatched))
        self._indexes.put(module, (component,), (matches, coverage))
        return matches, coverage

    def coverage(self, unet: nn.Module | None = None,
                 text_encoder: nn.Module | None = None) -> CoverageReport:
        """Layers matched / present for each component whose module is given."""
        given = ((UNET, unet), (TEXT_ENCODER, text_encoder))
        parts = [self._match(c, m)[1] for c, m in given if m is not None]
        return CoverageReport(self.path, tuple(parts), self._parsed.unrecognised)

    def check(self, component: str, module: nn.Module, allow_partial: bool = False) -> ComponentCoverage:
        """Coverage of one component; unmatched or unrecognised keys raise LoRAError unless allow_partial."""
        component = canonical_component(component)
        _, coverage = self._match(component, module)
        problems = coverage.unmatched + self._parsed.unrecognised
        if problems:
            message = (f"{len(problems)} LoRA key(s) do not match this SD1.5 {component.replace('_', ' ')} "
                       f"({coverage}): {describe_unmatched(problems)}")
            if not allow_partial:
                raise LoRAError(self.path, message + ". Is this a LoRA for another model (SDXL, SD2)? "
                                           "Use allow_partial to apply only the layers that match.")
            warnings.warn(f"{self.path}: {message}; applying the {coverage.matched} that match", stacklevel=3)
        return coverage

    def deltas(self, component: str, module: nn.Module, allow_partial: bool = False) -> dict[str, mx.array]:
        """Parameter name -> fp32 weight delta at strength 1, in MLX layout (computed on each call)."""
        component = canonical_component(component)
        self.check(component, module, allow_partial)
        matches, _ = self._match(component, module)
        params = dict(tree_flatten(module.parameters()))
        result = {}
        for target, layers in matches.items():
            name = target + ".weight"
            mlx_shape = tuple(params[name].shape)
            weight_shape = torch_shape(mlx_shape)
            total = None
            for layer in layers:
                delta = compute_delta(layer, weight_shape)
                if layer.dora_scale is not None:  # DoRA needs the base weight, in torch layout
                    base = _to_torch_layout(np.array(params[name].astype(mx.float32)))
                    delta = dora_delta(base, delta, layer.dora_scale)
                total = delta if total is None else total + delta
            result[name] = mx.array(to_mlx_layout(total, mlx_shape))
        mx.eval(list(result.values()))
        return result


def _to_torch_layout(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(0, 3, 1, 2) if weight.ndim == 4 else weight


def _resolve(index: ModuleIndex, layer: LoRAModule) -> str | None:
    if layer.underscored:
        return index.resolve(layer.name, underscored=True)
    for candidate in layer.dotted_candidates():
        target = index.resolve(candidate, underscored=False)
        if target is not None:
            return target
    return None


def lora_from_tensors(tensors: Mapping[str, np.ndarray], path: str | Path, fingerprint: str) -> LoRA:
    """Build a LoRA from tensors already in memory (`path` is used in messages only)."""
    return LoRA(path, parse_lora(tensors, path), fingerprint)


def load_lora(path: str | Path, fingerprint: str | None = None) -> LoRA:
    """Read and parse a LoRA file (.safetensors, .ckpt, .pt). `fingerprint` is the caller's identity of the
    file (sdgraph passes the engine's, graph/fingerprint.py); without it the file's content is hashed. Each
    call reads the file: keeping parsed LoRAs is the caller's job. Any problem -> LoRAError naming the file
    (and key)."""
    if not os.path.isfile(path):
        raise LoRAError(path, "file not found; check the path and the loras folder")
    return lora_from_tensors(read_tensors(path), path, fingerprint or file_fingerprint(path))
