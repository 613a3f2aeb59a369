"""Hypernetwork modules in MLX, and attaching them to a UNet's attentions without touching the UNet.

`attach_hypernetworks(unet, [(file, strength), ...])` returns a new module tree (sharing every UNet array)
whose attentions with a matching k/v input width carry a `kv_patches` list; `Attention` in
sd/models/unet_blocks.py runs it on the k and v inputs. The patches are module children, so their weights
are part of the UNet's parameters and reach a compiled graph as inputs like any other weight. They compute
in float32 whatever the UNet's dtype, as ComfyUI keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from sd.hypernetwork.reader import HypernetworkFile, Layer
from sd.lora.patching import copy_tree

_ACTIVATIONS = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
                "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the files were trained with


def _module(layer: Layer) -> nn.Module:
    if layer.kind == "act":
        return _ACTIVATIONS[layer.activation]()
    if layer.kind == "norm":
        norm = nn.LayerNorm(layer.weight.shape[0], eps=LAYER_NORM_EPS)
    else:
        norm = nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
    norm.weight, norm.bias = mx.array(layer.weight), mx.array(layer.bias)
    return norm


class HypernetworkMLP(nn.Module):
    """One module of a pair: its layers in order (Linear, activation, LayerNorm ...)."""

    def __init__(self, layers: Sequence[Layer]):
        super().__init__()
        self.layers = [_module(layer) for layer in layers]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class Hypernetwork(nn.Module):
    """The (k, v) pair for one width at one strength: k_in + k(k_in) * s, v_in + v(v_in) * s."""

    def __init__(self, k_layers: Sequence[Layer], v_layers: Sequence[Layer], strength: float):
        super().__init__()
        self.k = HypernetworkMLP(k_layers)
        self.v = HypernetworkMLP(v_layers)
        self.strength = float(strength)  # a plain attribute, not a parameter

    def __call__(self, k_in: mx.array, v_in: mx.array) -> tuple[mx.array, mx.array]:
        k32, v32 = k_in.astype(mx.float32), v_in.astype(mx.float32)
        k_out = k32 + self.k(k32) * self.strength
        v_out = v32 + self.v(v32) * self.strength
        return k_out.astype(k_in.dtype), v_out.astype(v_in.dtype)


def attach_hypernetworks(unet: nn.Module,
                         hypernetworks: Sequence[tuple[HypernetworkFile, float]]) -> nn.Module:
    """A new UNet tree equal to `unet` whose attentions run the hypernetworks (in order) on their k/v inputs,
    where a hypernetwork has modules of the attention's k/v input width; `unet` is not modified."""
    from sd.models.unet_blocks import Attention

    if not hypernetworks:
        return unet
    patched = copy_tree(unet)
    for module in [m for _, m in patched.named_modules() if isinstance(m, Attention)]:
        width = module.to_k.weight.shape[1]
        patches = [Hypernetwork(*hn.modules[width], strength) for hn, strength in hypernetworks
                   if width in hn.modules]
        if patches:
            module.kv_patches = patches
    mx.eval(patched.parameters())
    return patched
