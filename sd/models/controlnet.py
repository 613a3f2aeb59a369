"""ControlNet (LDM `cldm.ControlNet`) in MLX, NHWC: the UNet's encoder half (sd/models/unet.py's
`UNetEncoder`, the same traversal) plus a hint encoder and one zero-initialised 1x1 conv per skip.

    residuals = controlnet(x [B,h,w,4], timesteps [B], context [B,L,D], hint [B,8h,8w,3])
    -> ControlResiduals(output=(12 skips' residuals), middle=...)     (sd/models/unet_extras.py)

Parameter names are the LDM file's without `control_model.`: `input_hint_block.{0,2,...}` (convs with SiLU
between; every other one from the third on halves the size), `zero_convs.i.0`, `middle_block_out.0`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.models.ops import PLAIN, PlainOps
from sd.models.unet import UNetConfig, UNetEncoder, _Runner, input_channels, unet_config_from_weights
from sd.models.unet_extras import NO_EXTRAS, ControlResiduals


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig
    hint_channels: tuple[int, ...]  # the hint block's channels: its input first, then each conv's output


class ControlNet(UNetEncoder):
    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet)
        self.control_config = config
        chans = config.hint_channels
        self.input_hint_block = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            if i:
                self.input_hint_block.append(nn.SiLU())
            # LDM: 3x3 convs; the 3rd, 5th, 7th ... (all but the first and last) of even position stride 2
            stride = 2 if 0 < i < len(chans) - 2 and i % 2 == 0 else 1
            self.input_hint_block.append(nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
        self.zero_convs = [[nn.Conv2d(c, c, 1)] for c in input_channels(config.unet)]
        middle = input_channels(config.unet)[-1]
        self.middle_block_out = [nn.Conv2d(middle, middle, 1)]

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array, hint: mx.array,
                 ops: PlainOps = PLAIN) -> ControlResiduals:
        emb = self.embed(timesteps)
        dtype = emb.dtype
        context = context.astype(dtype)
        ops = ops.for_step(self, emb, context)
        guided = hint.astype(dtype)
        for layer in self.input_hint_block:
            guided = ops.conv2d(layer, guided) if isinstance(layer, nn.Conv2d) else nn.silu(guided)
        run = _Runner(emb, context, ops, NO_EXTRAS)
        h, skips = self.encode(x.astype(dtype), emb, context, ops, NO_EXTRAS, run, after_first=guided)
        outs = tuple(ops.conv2d(zero[0], skip) for zero, skip in zip(self.zero_convs, skips, strict=True))
        return ControlResiduals(output=outs, middle=ops.conv2d(self.middle_block_out[0], h))


def controlnet_config_from_weights(shapes: Mapping[str, tuple]) -> ControlNetConfig:
    """The ControlNet's sizes from its prefix-stripped LDM key -> shape (PyTorch layout) mapping; KeyError
    naming a missing key."""
    in_channels = shapes["input_blocks.0.0.weight"][1]
    unet = unet_config_from_weights({**shapes, "out.2.weight": (in_channels,)})  # no output half
    indices = sorted(int(k.split(".")[1]) for k in shapes
                     if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if not indices:
        raise KeyError("input_hint_block.0.weight")
    if indices != list(range(0, 2 * len(indices), 2)):
        raise ValueError(f"the hint block's convs are at {indices}, not every other index")
    hint = [shapes[f"input_hint_block.{i}.weight"] for i in indices]
    return ControlNetConfig(unet, (hint[0][1],) + tuple(s[0] for s in hint))
