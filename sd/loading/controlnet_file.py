"""ControlNet files to MLX modules (sd/models/controlnet.py), as ComfyUI's `comfy.controlnet.load_controlnet`
reads them:

    LDM layout        control_model.input_blocks... / zero_convs.i.0 / middle_block_out.0 / input_hint_block.N
                      (also without the `control_model.` prefix)
    diffusers layout  ControlNetModel's names: down_blocks... / controlnet_cond_embedding.* /
                      controlnet_down_blocks.i / controlnet_mid_block (renamed onto the LDM layout here)
    diff ControlNets  LDM layout with a `difference` key: the weights are differences from the UNet's, so the
                      UNet's weights (DiffControlNetLoader's model) are added to every key the UNet also has

Sizes are read off the shapes; `.safetensors` (fp16/fp32/bf16) and `.pth`/`.ckpt` read through sd/io, safely.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from sd.errors import ArchitectureError, CheckpointError
from sd.io.checkpoint_io import open_tensors
from sd.models.controlnet import ControlNet, controlnet_config_from_weights
from sd.models.t2i_adapter import T2IAdapter, adapter_config_from_weights

LDM_PREFIX = "control_model."
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "controlnet_mid_block": "middle_block_out.0",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0"}
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def is_diffusers(names) -> bool:
    return "controlnet_cond_embedding.conv_in.weight" in names


def ldm_names(names: list[str]) -> dict[str, str]:
    """{our (LDM, prefix-free) name: file key} for an LDM-layout or diffusers-layout ControlNet."""
    if not is_diffusers(names):
        if all(k.startswith(LDM_PREFIX) or k == "difference" for k in names):
            return {k[len(LDM_PREFIX):]: k for k in names if k != "difference"}
        return {k: k for k in names if k != "difference"}
    per_level = 1 + len({m.group(3) for k in names if (m := _DOWN.match(k)) and m.group(1) == "0"
                         and m.group(2) == "resnets"})
    hint_blocks = {int(k.split(".")[2]) for k in names if k.startswith("controlnet_cond_embedding.blocks.")}
    out = {}
    for key in names:
        stem, _, kind = key.rpartition(".")
        if stem in _TOP:
            name = f"{_TOP[stem]}.{kind}"
        elif stem == "controlnet_cond_embedding.conv_out":
            name = f"input_hint_block.{2 * (len(hint_blocks) + 1)}.{kind}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", stem):
            name = f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{kind}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", stem):
            name = f"zero_convs.{m.group(1)}.0.{kind}"
        elif m := _DOWN.match(key):
            level, part, index, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if part == "downsamplers":
                block = (level + 1) * per_level
                name = f"input_blocks.{block}.0.{rest.replace('conv.', 'op.')}"
            else:
                block = 1 + level * per_level + index
                name = (f"input_blocks.{block}.0.{_resnet(rest)}" if part == "resnets"
                        else f"input_blocks.{block}.1.{rest}")
        elif m := _MID.match(key):
            part, index, rest = m.groups()
            name = (f"middle_block.{2 * int(index)}.{_resnet(rest)}" if part == "resnets"
                    else f"middle_block.1.{rest}")
        else:
            name = key  # left for the strict check to report
        out[name] = key
    return out


_ADAPTER_BLOCK = re.compile(r"adapter\.body\.(\d+)\.(resnets\.(\d+)\.)?(.+)$")


def adapter_names(names: list[str]) -> dict[str, str] | None:
    """{our name: file key} for a T2I-Adapter (TencentARC/ComfyUI layout, or diffusers' `adapter.*` names:
    FullAdapter's `body.i.resnets.j` become `body.{i * blocks + j}`, LightAdapter's `body.i.body.j`), else
    None."""
    if "conv_in.weight" in names or "body.0.in_conv.weight" in names:
        return {k: k for k in names}
    if "adapter.conv_in.weight" not in names and "adapter.body.0.in_conv.weight" not in names:
        return None
    light = "adapter.body.0.out_conv.weight" in names
    per_level = len({m.group(3) for k in names if (m := _ADAPTER_BLOCK.match(k)) and m.group(1) == "0"
                     and m.group(3) is not None})
    out = {}
    for key in names:
        m = _ADAPTER_BLOCK.match(key)
        if m is None:
            out[key.removeprefix("adapter.")] = key
            continue
        level, block, rest = int(m.group(1)), m.group(3), m.group(4)
        if light:
            out[f"body.{level}." + (f"body.{block}.{rest}" if block is not None else rest)] = key
        else:
            out[f"body.{level * per_level + int(block or 0)}.{rest}"] = key
    return out


def _resnet(rest: str) -> str:
    stem, _, kind = rest.rpartition(".")
    return f"{_RESNET.get(stem, stem)}.{kind}"


def check_kind(path: object, keys: list[str]) -> None:
    """ArchitectureError naming the file unless its keys are a ControlNet's or a T2I-Adapter's."""
    if "zero_convs.0.0.weight" in ldm_names(keys) or adapter_names(keys) is not None:
        return
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "lora_")) for k in keys):
        raise ArchitectureError(path, "this is a Stable Diffusion checkpoint or LoRA, not a ControlNet; "
                                      "put it in models/checkpoints or models/loras")
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise ArchitectureError(path, "not a ControlNet or T2I-Adapter (no zero_convs.0.0.weight, "
                                  f"conv_in.weight or body.0.in_conv.weight; its keys start {sample})")


def describe(model: ControlNet | T2IAdapter) -> str:
    if isinstance(model, T2IAdapter):
        c = model.config
        return (f"T2I-Adapter{' (light)' if c.light else ''}, channels {c.channels}, hint "
                f"{c.hint_channels} channel{'s' if c.hint_channels > 1 else ''}")
    c = model.control_config.unet
    return (f"ControlNet, {c.model_channels} channels x {c.channel_mult}, hint "
            f"{model.control_config.hint_channels[0]} channels")


def load_controlnet(path: str | Path, dtype: mx.Dtype = mx.float32,
                    unet_weights: Mapping[str, mx.array] | None = None) -> ControlNet | T2IAdapter:
    """The ControlNet (or T2I-Adapter, as ComfyUI's ControlNetLoader also reads them) in `path`.
    `unet_weights` (our UNet's parameters, MLX layout) are added to a diff ControlNet's weights (ComfyUI's
    DiffControlNetLoader); without them a diff ControlNet is an error."""
    path = Path(path)
    tensors = open_tensors(path)
    keys = list(tensors)
    names = ldm_names(keys)
    if "zero_convs.0.0.weight" not in names and (adapter := adapter_names(keys)) is not None:
        shapes = {name: tuple(tensors.shape(key)) for name, key in adapter.items()}
        try:
            model = T2IAdapter(adapter_config_from_weights(shapes))
        except (KeyError, ValueError) as e:
            raise ArchitectureError(path, f"a T2I-Adapter sdgraph cannot read: {e}") from None
        return _fill(path, model, tensors, adapter, dtype, None)
    check_kind(path, keys)
    shapes = {name: tuple(tensors.shape(key)) for name, key in names.items()}
    try:
        model = ControlNet(controlnet_config_from_weights(shapes))
    except (KeyError, ValueError) as e:
        raise CheckpointError(path, f"a ControlNet whose layers sdgraph cannot place ({e})") from None
    difference = "difference" in keys
    if difference and unet_weights is None:
        raise ArchitectureError(path, "a diff ControlNet (weights relative to a UNet): load it with "
                                      "DiffControlNetLoader, which adds the model's UNet weights")
    return _fill(path, model, tensors, names, dtype, unet_weights if difference else None)


def _fill(path: Path, model, tensors, names: Mapping[str, str], dtype: mx.Dtype,
          unet_weights: Mapping[str, mx.array] | None):
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(names))
    unexpected = sorted(set(names) - set(params))
    if missing or unexpected:
        raise CheckpointError(path, f"layout mismatch: missing {missing[:4]}, unexpected "
                                    f"{[names[u] for u in unexpected[:4]]}")
    weights = []
    for name, param in params.items():
        array = np.asarray(tensors[names[name]], dtype=np.float32)
        if array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))  # OIHW -> OHWI
        if array.shape != tuple(param.shape):
            raise CheckpointError(path, f"tensor {names[name]} has shape {array.shape}, expected "
                                        f"{tuple(param.shape)}")
        value = mx.array(array)
        if unet_weights is not None and name in unet_weights:
            value = value + unet_weights[name].astype(mx.float32)
        weights.append((name, value.astype(dtype)))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model
