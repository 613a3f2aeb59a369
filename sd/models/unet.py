"""The SD1.x denoising UNet (LDM `openaimodel.UNetModel`) in MLX, NHWC.

Parameter names equal the checkpoint keys without `model.diffusion_model.` (see docs/CONTRACTS.md).
The architecture comes from `UNetConfig`, read off the weights by `unet_config_from_weights`; nothing
here knows SD1.5's sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.models.ops import PLAIN, PlainOps
from sd.models.unet_blocks import Downsample, ResBlock, SpatialTransformer, Upsample, group_norm
from sd.models.unet_extras import NO_EXTRAS, Site, UNetExtras

NORM_GROUPS = 32  # LDM's GroupNorm32


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]  # levels (indices into channel_mult) that carry SpatialTransformers
    transformer_depth: int
    context_dim: int
    # Heads cannot be read from shapes (q/k/v are one inner-dim matrix). SD1.x's configs fix the head
    # *count* (num_heads=8, num_head_channels=-1), so the head width grows with the level's channels.
    num_heads: int = 8

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def timestep_embedding(timesteps: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """LDM's sinusoidal embedding, cos half first (diffusers: flip_sin_to_cos=True, freq_shift=0), fp32."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def input_channels(config: UNetConfig) -> tuple[int, ...]:
    """Channels of each input block's output (the skips; a ControlNet's zero convs)."""
    out, last = [config.model_channels], len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        out += [mult * config.model_channels] * (config.num_res_blocks + (level < last))
    return tuple(out)


class UNetEncoder(nn.Module):
    """The UNet's time embedding, input blocks and middle block: what the UNet and a ControlNet
    (sd/models/controlnet.py) share, with the one traversal both run (`encode`)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, emb_dim, groups = config.model_channels, config.time_embed_dim, NORM_GROUPS
        self.time_embed = [nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)]

        self.input_blocks = [[nn.Conv2d(config.in_channels, mc, 3, padding=1)]]
        channels = mc
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                block = [ResBlock(channels, mult * mc, emb_dim, groups)]
                channels = mult * mc
                if level in config.attention_levels:
                    block.append(self._transformer(channels))
                self.input_blocks.append(block)
            if level != last_level:
                self.input_blocks.append([Downsample(channels)])

        self.middle_block = [ResBlock(channels, channels, emb_dim, groups), self._transformer(channels),
                             ResBlock(channels, channels, emb_dim, groups)]

    def _transformer(self, channels: int) -> SpatialTransformer:
        c = self.config
        return SpatialTransformer(channels, c.num_heads, c.transformer_depth, c.context_dim, NORM_GROUPS)

    def embed(self, timesteps: mx.array) -> mx.array:
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.config.model_channels).astype(dtype)
        return self.time_embed[2](nn.silu(self.time_embed[0](t_emb)))

    def encode(self, x: mx.array, emb: mx.array, context: mx.array, ops: PlainOps, extras: UNetExtras,
               run: _Runner, after_first: mx.array | None = None) -> tuple[mx.array, list[mx.array]]:
        """Input blocks and middle block: (middle output, the skips). `after_first` is added to the first
        conv's output (a ControlNet's guided hint); control residuals are added where extras say."""
        h = ops.conv2d(self.input_blocks[0][0], x)
        if after_first is not None:
            h = h + after_first.astype(h.dtype)
        h = extras.add_control("input", 0, h)
        skips = [h]
        for index, block in enumerate(self.input_blocks[1:], start=1):
            for layer in block:
                h = run(layer, h, ("input", index))
            skips.append(extras.add_control("input", index, h))
            h = skips[-1]
        for layer in self.middle_block:
            h = run(layer, h, ("middle", 0))
        return extras.add_control("middle", 0, h), skips


class _Runner:
    """Runs one layer of a block, counting transformer blocks over the model (Site.ordinal)."""

    def __init__(self, emb: mx.array, context: mx.array, ops: PlainOps, extras: UNetExtras):
        self.emb, self.context, self.ops, self.extras = emb, context, ops, extras
        self.ordinal = 0

    def __call__(self, layer, h: mx.array, site: tuple[str, int]) -> mx.array:
        if isinstance(layer, SpatialTransformer):
            site = Site(site[0], site[1], 0, self.ordinal)
            h = layer(h, self.emb, self.context, self.ops, self.extras, site)
            self.ordinal += len(layer.transformer_blocks)
            return h
        return layer(h, self.emb, self.context, self.ops)


class UNetModel(UNetEncoder):
    """`unet(x [B,h,w,C], timesteps [B], context [B,L,D], ops=PLAIN, extras=NO_EXTRAS) -> eps [B,h,w,C]`,
    output in x's dtype.

    `ops` computes the convolutions, norms and attention (sd/models/ops.py); sd/accel passes its own.
    `extras` carries what one call adds: concat channels, control residuals, attention and block patches
    (sd/models/unet_extras.py)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        mc, emb_dim, groups = config.model_channels, config.time_embed_dim, NORM_GROUPS
        skip_channels = list(input_channels(config))
        channels = skip_channels[-1]
        self.output_blocks = []
        for level in reversed(range(len(config.channel_mult))):
            out_channels = config.channel_mult[level] * mc
            for index in range(config.num_res_blocks + 1):
                block = [ResBlock(channels + skip_channels.pop(), out_channels, emb_dim, groups)]
                channels = out_channels
                if level in config.attention_levels:
                    block.append(self._transformer(channels))
                if level != 0 and index == config.num_res_blocks:
                    block.append(Upsample(channels))
                self.output_blocks.append(block)

        self.out = [group_norm(groups, channels, 1e-5), nn.SiLU(),
                    nn.Conv2d(channels, config.out_channels, 3, padding=1)]

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array,
                 ops: PlainOps = PLAIN, extras: UNetExtras = NO_EXTRAS) -> mx.array:
        emb = self.embed(timesteps)
        dtype = emb.dtype
        context = context.astype(dtype)
        ops = ops.for_step(self, emb, context)  # a backend may project for many blocks at once here
        run = _Runner(emb, context, ops, extras)

        x_in = x if extras.concat is None else mx.concatenate([x, extras.concat.astype(x.dtype)], axis=-1)
        h, skips = self.encode(x_in.astype(dtype), emb, context, ops, extras, run)
        for index, block in enumerate(self.output_blocks):
            h, skip = extras.before_output_block(h, skips.pop(), index, len(skips))
            h = mx.concatenate([h, skip], axis=-1)
            for layer in block:
                if isinstance(layer, Upsample):  # match the next skip, which may have an odd side
                    h = layer(h, ops=ops, output_hw=tuple(skips[-1].shape[1:3]))
                else:
                    h = run(layer, h, ("output", index))
        h = ops.norm_silu_conv(self.out[0], self.out[2], h)
        return h.astype(x.dtype)


_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def _block_count(shapes: Mapping[str, tuple], pattern: re.Pattern, prefix: str = "") -> int:
    indices = {int(m.group(1)) for key in shapes
               if key.startswith(prefix) and (m := pattern.match(key[len(prefix):]))}
    return max(indices) + 1 if indices else 0


def unet_config_from_weights(shapes: Mapping[str, tuple]) -> UNetConfig:
    """Read an SD1.x-layout UNet's hyper-parameters from its prefix-stripped key -> shape mapping.

    Raises KeyError (naming the key) when the layout lacks a key it needs and ValueError when the
    layout is irregular; `sd.loading.detect` turns both into errors that name the file.
    """
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    out_channels = shapes["out.2.weight"][0]

    levels: list[list[int]] = [[]]  # output channels of each level's res blocks
    attention: list[bool] = []
    for index in range(1, _block_count(shapes, _INPUT_BLOCK)):
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
            continue
        levels[-1].append(shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0])
        attention.append(f"input_blocks.{index}.1.proj_in.weight" in shapes)

    res_blocks = {len(level) for level in levels}
    if len(res_blocks) != 1 or not levels[0]:
        raise ValueError(f"levels have different numbers of res blocks: {[len(lv) for lv in levels]}")
    num_res_blocks = res_blocks.pop()
    attention_levels = tuple(lv for lv in range(len(levels)) if attention[lv * num_res_blocks])

    attn_prefix = "middle_block.1."
    depth = _block_count(shapes, _TRANSFORMER_BLOCK, attn_prefix)
    if depth == 0:
        raise KeyError(f"{attn_prefix}transformer_blocks.0.attn2.to_k.weight")
    context_dim = shapes[f"{attn_prefix}transformer_blocks.0.attn2.to_k.weight"][1]

    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(level[-1] // model_channels for level in levels),
        num_res_blocks=num_res_blocks,
        attention_levels=attention_levels,
        transformer_depth=depth,
        context_dim=context_dim,
    )
