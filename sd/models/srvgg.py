"""Real-ESRGAN's SRVGGNetCompact in MLX, NHWC (realesr-general-x4v3, realesr-animevideov3, the "Compact"
community models): a plain stack of 3x3 convs with PReLUs at low resolution, one pixel shuffle, and the
nearest-upsampled input added back.

Parameter names are the files': `body.0` the first conv, `body.1` its PReLU, ..., `body.N` the last conv
(out_channels * scale^2 outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.models.ops import PLAIN, PlainOps
from sd.models.pixels import pixel_shuffle, upsample_nearest


@dataclass(frozen=True)
class CompactConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    num_conv: int = 16       # convs between the first and the last
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


class SRVGGNetCompact(nn.Module):
    """x [B, H, W, C] in [0, 1] -> [B, H*scale, W*scale, C_out]."""

    def __init__(self, config: CompactConfig):
        super().__init__()
        c = config
        self.config = c
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.num_feat, 3, padding=1), nn.PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [nn.Conv2d(c.num_feat, c.num_feat, 3, padding=1), nn.PReLU(c.num_feat)]
        layers.append(nn.Conv2d(c.num_feat, c.out_channels * c.upscale * c.upscale, 3, padding=1))
        self.body = layers

    @property
    def scale(self) -> int:
        return self.config.upscale

    pad_multiple = 1

    @property
    def dtype(self) -> mx.Dtype:
        return self.body[0].weight.dtype

    @property
    def image_channels(self) -> int:
        return self.config.in_channels

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        out = x
        for layer in self.body:
            out = ops.conv2d(layer, out) if isinstance(layer, nn.Conv2d) else layer(out)
        # the network learns the residual over the nearest-upsampled input
        return pixel_shuffle(out, self.config.upscale) + upsample_nearest(x, self.config.upscale)
