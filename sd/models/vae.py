"""The SD1.x VAE (LDM ``AutoencoderKL``) in MLX, NHWC.

Module and parameter names follow the original checkpoint layout with the ``first_stage_model.`` prefix
removed (``encoder.down.0.block.1.conv1.weight``, ``decoder.mid.attn_1.q.weight``, ``quant_conv.weight``), so
loading is a near-identity mapping plus the OIHW -> OHWI conv transpose every 4-D weight needs. The mid-block
attention's q/k/v/proj_out are 1x1 convs, exactly as stored in the file. Every forward takes `ops`
(sd/models/ops.py), which computes the convolutions, norms and attention, plainly or accelerated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.errors import CheckpointError
from sd.models.ops import PLAIN, PlainOps, upsample_nearest_2x

# LDM hard-codes these; they cannot be read from tensor shapes.
NORM_GROUPS = 32
NORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3            # image channels
    out_channels: int = 3
    base_channels: int = 128        # ``ch`` in LDM
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2         # per encoder level; the decoder has one more
    z_channels: int = 4             # decoder input / half the encoder output (double_z)
    embed_dim: int = 4              # latent channels after quant_conv


def vae_config_from_weights(shapes: Mapping[str, tuple], path: object = "<vae>") -> VAEConfig:
    """Read the VAE hyper-parameters from prefix-stripped key -> shape (PyTorch layout, convs OIHW)."""

    def shape(key: str) -> tuple:
        if key not in shapes:
            raise CheckpointError(path, f"VAE key '{key}' is missing; is this a complete SD1.x VAE?")
        return tuple(shapes[key])

    conv_in = shape("encoder.conv_in.weight")
    base = conv_in[0]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if not levels or not blocks:
        raise CheckpointError(path, "no 'encoder.down.N.block.M' keys: not an LDM-layout VAE")
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // base for i in levels)
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=len(blocks),
        z_channels=shape("decoder.conv_in.weight")[1],
        embed_dim=shape("post_quant_conv.weight")[0],
    )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        h = ops.norm_silu_conv(self.norm1, self.conv1, x)
        h = ops.norm_silu_conv(self.norm2, self.conv2, h)
        if "nin_shortcut" in self:
            x = ops.conv2d(self.nin_shortcut, x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in the file."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        b, h, w, c = x.shape
        y = ops.group_norm(self.norm, x)
        q, k, v = (ops.conv2d(p, y).reshape(b, h * w, c) for p in (self.q, self.k, self.v))
        out = ops.attention(q, k, v, 1, c**-0.5)
        return x + ops.conv2d(self.proj_out, out.reshape(b, h, w, c))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        # LDM pads right/bottom only, then convolves without padding
        return ops.conv2d(self.conv, mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        return ops.conv2d(self.conv, upsample_nearest_2x(x))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x, ops), ops), ops)


class Level(nn.Module):
    """One resolution level: ``block`` list plus an optional ``downsample``/``upsample``."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, resample: type[nn.Module] | None,
                 resample_name: str):
        super().__init__()
        self.block = [ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(num_blocks)]
        if resample is not None:
            setattr(self, resample_name, resample(out_ch))
        self._resample_name = resample_name

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        for block in self.block:
            x = block(x, ops)
        if self._resample_name in self:
            x = self[self._resample_name](x, ops)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = [
            Level([cfg.base_channels, *chans][i], chans[i], cfg.num_res_blocks,
                  Downsample if i != last else None, "downsample")
            for i in range(len(chans))
        ]
        self.mid = MidBlock(chans[-1])
        self.norm_out = _norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        x = ops.conv2d(self.conv_in, x)
        for level in self.down:
            x = level(x, ops)
        x = self.mid(x, ops)
        return ops.norm_silu_conv(self.norm_out, self.conv_out, x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1])
        # up[i] works at the resolution of down[i]; it is run from the last index to 0, as in LDM
        self.up = [
            Level(chans[i + 1] if i + 1 < len(chans) else chans[-1], chans[i], cfg.num_res_blocks + 1,
                  Upsample if i != 0 else None, "upsample")
            for i in range(len(chans))
        ]
        self.norm_out = _norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        x = self.mid(ops.conv2d(self.conv_in, z), ops)
        for level in reversed(self.up):
            x = level(x, ops)
        return ops.norm_silu_conv(self.norm_out, self.conv_out, x)


class AutoencoderKL(nn.Module):
    """``encode``: image [B,H,W,3] in [-1,1] -> unscaled latent [B,H/8,W/8,4] (posterior mode);
    ``decode``: unscaled latent -> image. The 0.18215 scale belongs to sampling, not here. Inputs are cast to
    the weights' dtype (an fp32 input would otherwise promote every half-precision activation to fp32)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, image: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        moments = ops.conv2d(self.quant_conv, self.encoder(image.astype(self.dtype), ops))
        return moments[..., : self.config.embed_dim]  # the mean is the mode of the diagonal Gaussian

    def decode(self, latent: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        return self.decoder(ops.conv2d(self.post_quant_conv, latent.astype(self.dtype)), ops)
