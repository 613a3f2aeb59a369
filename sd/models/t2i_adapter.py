"""T2I-Adapter (TencentARC; ComfyUI's comfy/t2i_adapter/adapter.py) in MLX, NHWC: a small conv net over the
pixel-unshuffled hint whose per-level features are added to the UNet's input blocks.

    residuals = adapter(hint [B, H, W, c])    (H, W multiples of 8; computed once per hint, not per step)
    -> ControlResiduals(input=(None, None, f0, None, None, f1, ...))

Two key layouts, as ComfyUI reads them: `Adapter` (conv_in, body.N.{down_opt.op, in_conv, block1, block2};
skip connections are identities, `sk=True`) and `Adapter_light` (body.i.{in_conv, body.j.{block1, block2},
out_conv}). Feature i lands on input block 3i + 2, the last res block of level i in an SD1.x UNet
(ComfyUI's `[None, None, x]` per level). Pooling follows ComfyUI's (odd sides zero-padded, the zeros counted),
which differs from diffusers' ceil_mode pooling on odd sizes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.models.unet_extras import ControlResiduals

UNSHUFFLE = 8
LEVELS = 4  # ComfyUI builds every SD1.x Adapter with four levels


def pixel_unshuffle(x: mx.array, r: int) -> mx.array:
    """torch's PixelUnshuffle in NHWC: channel c*r*r + i*r + j holds pixel (i, j) of each r x r cell."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def avg_pool_2x(x: mx.array) -> mx.array:
    """ComfyUI's Downsample without a conv: 2x2 means, odd sides zero-padded by one (counted in the mean)."""
    _, h, w, _ = x.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
        oh, ow = (x.shape[1] - 2) // 2 + 1, (x.shape[2] - 2) // 2 + 1
        x = x[:, :2 * oh, :2 * ow]
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@dataclass(frozen=True)
class AdapterConfig:
    light: bool
    in_channels: int  # after unshuffling: hint channels x 64
    channels: tuple[int, ...]  # per level
    nums_rb: int
    ksize: int = 1
    use_conv: bool = False

    @property
    def hint_channels(self) -> int:
        return self.in_channels // (UNSHUFFLE * UNSHUFFLE)


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool, ksize: int, use_conv: bool):
        super().__init__()
        self.down, self.use_conv = down, use_conv
        if down and use_conv:
            self.down_opt = _Down(cin)
        if cin != cout:
            self.in_conv = nn.Conv2d(cin, cout, ksize, padding=ksize // 2)
        self.block1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.block2 = nn.Conv2d(cout, cout, ksize, padding=ksize // 2)

    def __call__(self, x: mx.array) -> mx.array:
        if self.down:
            x = self.down_opt.op(x) if self.use_conv else avg_pool_2x(x)
        if "in_conv" in self:
            x = self.in_conv(x)
        return self.block2(nn.relu(self.block1(x))) + x


class _LightResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block1 = nn.Conv2d(c, c, 3, padding=1)
        self.block2 = nn.Conv2d(c, c, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block2(nn.relu(self.block1(x))) + x


class Extractor(nn.Module):
    def __init__(self, cin: int, inter: int, cout: int, nums_rb: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, inter, 1)
        self.body = [_LightResBlock(inter) for _ in range(nums_rb)]
        self.out_conv = nn.Conv2d(inter, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.in_conv(avg_pool_2x(x) if self.down else x)
        for block in self.body:
            x = block(x)
        return self.out_conv(x)


class T2IAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        if config.light:
            ins = (config.in_channels, *ch[:-1])
            self.body = [Extractor(ins[i], ch[i] // 4, ch[i], config.nums_rb, down=i > 0)
                         for i in range(len(ch))]
        else:
            self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
            self.body = [ResnetBlock(ch[i - 1] if i and not j else ch[i], ch[i], bool(i and not j),
                                     config.ksize, config.use_conv)
                         for i in range(len(ch)) for j in range(config.nums_rb)]

    def __call__(self, hint: mx.array) -> ControlResiduals:
        dtype = self.body[0].in_conv.weight.dtype if self.config.light else self.conv_in.weight.dtype
        x = pixel_unshuffle(hint.astype(dtype), UNSHUFFLE)
        features: list[mx.array | None] = []
        if self.config.light:
            for block in self.body:
                x = block(x)
                features += [None, None, x]
        else:
            x = self.conv_in(x)
            for level in range(len(self.config.channels)):
                for j in range(self.config.nums_rb):
                    x = self.body[level * self.config.nums_rb + j](x)
                features += [None, None, x]
        return ControlResiduals(input=tuple(features))


def adapter_config_from_weights(shapes: Mapping[str, tuple]) -> AdapterConfig:
    """Sizes from the (PyTorch-layout) shapes of an `Adapter` or `Adapter_light` file; KeyError naming a
    missing key, ValueError for what sdgraph does not read (SDXL adapters, odd block counts)."""
    if "body.0.in_conv.weight" in shapes and "conv_in.weight" not in shapes:
        levels = len({k.split(".")[1] for k in shapes
                      if k.startswith("body.") and k.endswith(".out_conv.weight")})
        nums_rb = len({k.split(".")[3] for k in shapes
                       if k.startswith("body.0.body.") and k.endswith(".block1.weight")})
        return AdapterConfig(True, shapes["body.0.in_conv.weight"][1],
                             tuple(shapes[f"body.{i}.out_conv.weight"][0] for i in range(levels)), nums_rb)
    cout, cin = shapes["conv_in.weight"][:2]
    if cin in (256, 768):
        raise ValueError("an SDXL T2I-Adapter (input of 256 or 768 channels); sdgraph runs SD1.x")
    blocks = len({k.split(".")[1] for k in shapes if k.startswith("body.") and k.endswith(".block1.weight")})
    if blocks % LEVELS:
        raise ValueError(f"{blocks} res blocks do not split into {LEVELS} levels")
    nums_rb = blocks // LEVELS
    channels = tuple(shapes[f"body.{i * nums_rb}.block1.weight"][0] for i in range(LEVELS))
    return AdapterConfig(False, cin, channels, nums_rb, ksize=shapes["body.0.block2.weight"][2],
                         use_conv=any(k.endswith("down_opt.op.weight") for k in shapes))
