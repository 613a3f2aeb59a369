"""Read an A1111 hypernetwork `.pt` into layer lists, as ComfyUI's `load_hypernetwork_patch` builds them.

The file pickles a dict: each width (an int key, e.g. 768) maps to a pair of state dicts (k module, v
module) with `linear.N.weight` / `linear.N.bias` keys numbered as A1111's nn.Sequential numbers its layers;
beside them `activation_func`, `is_layer_norm`, `use_dropout`, `last_layer_dropout`, `activate_output`,
`layer_structure` and training details. ComfyUI walks a module's `.weight` names in file order: each is a
Linear, followed by the activation unless it is the last name (or activate_output), then, with
is_layer_norm, the next name is a LayerNorm. With layer norm the last Linear is therefore never the last
name, so it gets the activation too: ComfyUI's reading, kept here (A1111's own module does not activate the
last Linear unless activate_output). Dropout is off at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd.errors import CheckpointError
from sd.io.checkpoint_io import load_pickled
from sd.io.safe_pickle import TensorRef

# ComfyUI's table ("swish" is torch's Hardswish there, as in A1111)
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")


@dataclass(frozen=True)
class Layer:
    kind: str                       # "linear" | "norm" | "act"
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    activation: str | None = None


@dataclass(frozen=True)
class HypernetworkFile:
    """Per width: (k layers, v layers)."""

    path: Path
    modules: dict[int, tuple[tuple[Layer, ...], tuple[Layer, ...]]]
    activation: str
    layer_norm: bool


def _flag(state: dict, key: str, default):
    value = state.get(key, default)
    return default if value is None else value


def _array(path: Path, state: dict, name: str, where: str) -> np.ndarray:
    value = state.get(name)
    if not isinstance(value, TensorRef):
        raise CheckpointError(path, f"hypernetwork module {where} has no tensor '{name}'")
    return np.asarray(value.read(), dtype=np.float32)


def _layers(path: Path, state: object, where: str, activation: str, layer_norm: bool,
            activate_output: bool) -> tuple[Layer, ...]:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(path, f"hypernetwork module {where} is not a state dict of named tensors")
    names = [k[: -len(".weight")] for k in state if k.endswith(".weight")]
    layers, i = [], 0
    while i < len(names):
        last = i == len(names) - 1
        weight = _array(path, state, f"{names[i]}.weight", where)
        bias = _array(path, state, f"{names[i]}.bias", where)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise CheckpointError(path, f"hypernetwork module {where}: '{names[i]}' is not a linear layer "
                                        f"(weight {weight.shape}, bias {bias.shape})")
        layers.append(Layer("linear", weight, bias))
        if activation != "linear" and (not last or activate_output):
            layers.append(Layer("act", activation=activation))
        if layer_norm:
            i += 1
            if i >= len(names):
                raise CheckpointError(path, f"hypernetwork module {where}: is_layer_norm is set but "
                                            f"'{names[i - 1]}' has no layer norm after it")
            norm_w = _array(path, state, f"{names[i]}.weight", where)
            norm_b = _array(path, state, f"{names[i]}.bias", where)
            if norm_w.shape != (weight.shape[0],) or norm_b.shape != norm_w.shape:
                raise CheckpointError(path, f"hypernetwork module {where}: '{names[i]}' is not a layer "
                                            f"norm of width {weight.shape[0]}")
            layers.append(Layer("norm", norm_w, norm_b))
        i += 1
    return tuple(layers)


def _check_widths(path: Path, dim: int, layers: tuple[Layer, ...], where: str) -> None:
    width = dim
    for layer in layers:
        if layer.kind == "linear":
            if layer.weight.shape[1] != width:
                raise CheckpointError(path, f"hypernetwork module {where}: a linear layer takes "
                                            f"{layer.weight.shape[1]} features where {width} arrive")
            width = layer.weight.shape[0]
    if width != dim:
        raise CheckpointError(path, f"hypernetwork module {where} maps width {dim} to {width}; a "
                                    "hypernetwork module must return its input's width")


def load_hypernetwork(path: str | Path) -> HypernetworkFile:
    """Parse the file (nothing in it is executed); CheckpointError naming the file for anything malformed,
    including an activation ComfyUI does not support."""
    path = Path(path)
    state = load_pickled(path)
    if not isinstance(state, dict):
        raise CheckpointError(path, f"not a hypernetwork: the file holds a {type(state).__name__}, "
                                    "not a dict")
    activation = _flag(state, "activation_func", "linear")
    if activation not in ACTIVATIONS:
        raise CheckpointError(path, f"hypernetwork activation_func {str(activation)[:40]!r} is not supported "
                                    f"(supported: {', '.join(ACTIVATIONS)})")
    # ComfyUI reads use_dropout / last_layer_dropout only to place Dropout layers: inert at inference
    layer_norm = bool(_flag(state, "is_layer_norm", False))
    activate_output = bool(_flag(state, "activate_output", False))
    modules = {}
    for key, value in state.items():
        try:
            dim = int(key)
        except (TypeError, ValueError):
            continue
        if isinstance(key, bool) or dim <= 0:
            continue
        if not isinstance(value, (tuple, list)) or len(value) < 2:
            raise CheckpointError(path, f"hypernetwork entry {dim} is not a (k, v) pair of modules")
        pair = []
        for index, name in enumerate(("k", "v")):
            where = f"{dim}.{name}"
            layers = _layers(path, value[index], where, activation, layer_norm, activate_output)
            _check_widths(path, dim, layers, where)
            pair.append(layers)
        modules[dim] = (pair[0], pair[1])
    if not modules:
        raise CheckpointError(path, "not a hypernetwork: no per-width modules (integer keys such as 768)")
    return HypernetworkFile(path, modules, activation, layer_norm)

