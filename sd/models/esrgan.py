"""ESRGAN's RRDBNet in MLX, NHWC: the network of ESRGAN, BSRGAN, Real-ESRGAN x4plus/x2plus and the community
4x models (UltraSharp, Remacri, ...).

Parameter names are Real-ESRGAN's (BasicSR's) layout: `conv_first`, `body.N.rdbK.convJ`, `conv_body`,
`conv_upN`, `conv_hr`, `conv_last`; sd/loading/upscale_models.py maps the old ESRGAN layout
(`model.0`, `model.1.sub.N.RDBK.convJ.0`, ...) onto them. Real-ESRGAN's x2 and x1 models first fold pixels
into channels (pixel-unshuffle by 2 or 4) and upsample twice; `unshuffle` records that.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.models.ops import PLAIN, PlainOps
from sd.models.pixels import pixel_unshuffle, upsample_nearest

SLOPE = 0.2  # LeakyReLU's negative slope throughout the network


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int = 3     # of conv_first: image channels x unshuffle^2
    out_channels: int = 3
    num_feat: int = 64
    num_grow: int = 32       # channels each dense conv adds
    num_blocks: int = 23
    num_upsamples: int = 2   # nearest x2 + conv each
    unshuffle: int = 1       # pixel-unshuffle factor before conv_first (1: none)

    @property
    def scale(self) -> int:
        return 2 ** self.num_upsamples // self.unshuffle

    @property
    def image_channels(self) -> int:
        return self.in_channels // (self.unshuffle * self.unshuffle)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output; a residual scaled by 0.2."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1, self.conv2 = _conv(nf, gc), _conv(nf + gc, gc)
        self.conv3, self.conv4 = _conv(nf + 2 * gc, gc), _conv(nf + 3 * gc, gc)
        self.conv5 = _conv(nf + 4 * gc, nf)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(nn.leaky_relu(ops.conv2d(conv, mx.concatenate(features, axis=-1)), SLOPE))
        return ops.conv2d(self.conv5, mx.concatenate(features, axis=-1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual: three dense blocks, the sum scaled by 0.2."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        return self.rdb3(self.rdb2(self.rdb1(x, ops), ops), ops) * 0.2 + x


class RRDBNet(nn.Module):
    """x [B, H, W, C] in [0, 1] (H, W multiples of `unshuffle`) -> [B, H*scale, W*scale, C_out]."""

    def __init__(self, config: RRDBConfig):
        super().__init__()
        c = config
        self.config = c
        self.conv_first = _conv(c.in_channels, c.num_feat)
        self.body = [RRDB(c.num_feat, c.num_grow) for _ in range(c.num_blocks)]
        self.conv_body = _conv(c.num_feat, c.num_feat)
        for i in range(1, c.num_upsamples + 1):  # conv_up1, conv_up2, ... as the files name them
            setattr(self, f"conv_up{i}", _conv(c.num_feat, c.num_feat))
        self.conv_hr = _conv(c.num_feat, c.num_feat)
        self.conv_last = _conv(c.num_feat, c.out_channels)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_first.weight.dtype

    @property
    def image_channels(self) -> int:
        return self.config.image_channels

    @property
    def pad_multiple(self) -> int:
        """Input sides must be multiples of this; spandrel pads unshuffling models to multiples of 4."""
        return 4 if self.config.unshuffle > 1 else 1

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        conv = ops.conv2d
        if self.config.unshuffle > 1:
            x = pixel_unshuffle(x, self.config.unshuffle)
        feat = conv(self.conv_first, x)
        trunk = feat
        for block in self.body:
            trunk = block(trunk, ops)
        feat = feat + conv(self.conv_body, trunk)
        for i in range(1, self.config.num_upsamples + 1):
            feat = nn.leaky_relu(conv(getattr(self, f"conv_up{i}"), upsample_nearest(feat, 2)), SLOPE)
        return conv(self.conv_last, nn.leaky_relu(conv(self.conv_hr, feat), SLOPE))
