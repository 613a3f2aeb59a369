"""Random SD1.x UNet weights in the LDM checkpoint layout (keys without `model.diffusion_model.`).

Deliberately written apart from sd/models/unet.py: it spells out the LDM key list from the config the way
`openaimodel.UNetModel` numbers its blocks, so a naming slip in either is caught by the other.
Shapes are PyTorch's (convs OIHW).
"""

from __future__ import annotations

import numpy as np

from sd.models.unet import UNetConfig

SD15_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                       num_res_blocks=2, attention_levels=(0, 1, 2), transformer_depth=1, context_dim=768)

# SD1.5's structure (4 levels, attention on the first three, 2 res blocks, depth 1) at toy widths.
# Widths stay multiples of 32 for GroupNorm(32); context_dim equals the tiny CLIP's width.
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4, 4),
                       num_res_blocks=2, attention_levels=(0, 1, 2), transformer_depth=1, context_dim=64)

Shapes = dict[str, tuple[int, ...]]


def _conv(name: str, c_out: int, c_in: int, k: int) -> Shapes:
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def _linear(name: str, c_out: int, c_in: int, bias: bool = True) -> Shapes:
    shapes = {f"{name}.weight": (c_out, c_in)}
    if bias:
        shapes[f"{name}.bias"] = (c_out,)
    return shapes


def _norm(name: str, c: int) -> Shapes:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _resblock(p: str, c_in: int, c_out: int, emb: int) -> Shapes:
    s = {**_norm(f"{p}.in_layers.0", c_in), **_conv(f"{p}.in_layers.2", c_out, c_in, 3),
         **_linear(f"{p}.emb_layers.1", c_out, emb),
         **_norm(f"{p}.out_layers.0", c_out), **_conv(f"{p}.out_layers.3", c_out, c_out, 3)}
    if c_in != c_out:
        s.update(_conv(f"{p}.skip_connection", c_out, c_in, 1))
    return s


def _spatial_transformer(p: str, c: int, context: int, depth: int) -> Shapes:
    s = {**_norm(f"{p}.norm", c), **_conv(f"{p}.proj_in", c, c, 1)}
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", c), ("attn2", context)):
            s.update(_linear(f"{b}.{attn}.to_q", c, c, bias=False))
            s.update(_linear(f"{b}.{attn}.to_k", c, kv_dim, bias=False))
            s.update(_linear(f"{b}.{attn}.to_v", c, kv_dim, bias=False))
            s.update(_linear(f"{b}.{attn}.to_out.0", c, c))
        s.update(_linear(f"{b}.ff.net.0.proj", 8 * c, c))  # GEGLU: 2 x (4c)
        s.update(_linear(f"{b}.ff.net.2", c, 4 * c))
        for n in (1, 2, 3):
            s.update(_norm(f"{b}.norm{n}", c))
    s.update(_conv(f"{p}.proj_out", c, c, 1))
    return s


def unet_shapes(cfg: UNetConfig) -> Shapes:
    """Every UNet key and its PyTorch shape for `cfg`, in LDM order; allocates nothing."""
    mc, emb = cfg.model_channels, 4 * cfg.model_channels
    widths = [m * mc for m in cfg.channel_mult]
    n_levels = len(widths)
    s: Shapes = {**_linear("time_embed.0", emb, mc), **_linear("time_embed.2", emb, emb)}
    s.update(_conv("input_blocks.0.0", mc, cfg.in_channels, 3))

    block, c, skip_widths = 1, mc, [mc]
    for level in range(n_levels):
        for _ in range(cfg.num_res_blocks):
            s.update(_resblock(f"input_blocks.{block}.0", c, widths[level], emb))
            c = widths[level]
            if level in cfg.attention_levels:
                s.update(_spatial_transformer(f"input_blocks.{block}.1", c, cfg.context_dim,
                                              cfg.transformer_depth))
            skip_widths.append(c)
            block += 1
        if level < n_levels - 1:
            s.update(_conv(f"input_blocks.{block}.0.op", c, c, 3))
            skip_widths.append(c)
            block += 1

    s.update(_resblock("middle_block.0", c, c, emb))
    s.update(_spatial_transformer("middle_block.1", c, cfg.context_dim, cfg.transformer_depth))
    s.update(_resblock("middle_block.2", c, c, emb))

    block = 0
    for level in range(n_levels - 1, -1, -1):
        for i in range(cfg.num_res_blocks + 1):
            s.update(_resblock(f"output_blocks.{block}.0", c + skip_widths.pop(), widths[level], emb))
            c = widths[level]
            sub = 1
            if level in cfg.attention_levels:
                s.update(_spatial_transformer(f"output_blocks.{block}.1", c, cfg.context_dim,
                                              cfg.transformer_depth))
                sub = 2
            if level > 0 and i == cfg.num_res_blocks:
                s.update(_conv(f"output_blocks.{block}.{sub}.conv", c, c, 3))
            block += 1

    s.update(_norm("out.0", c))
    s.update(_conv("out.2", cfg.out_channels, c, 3))
    return s


def random_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Scaled so activations stay O(1): weights N(0, 1/fan_in), norm scales ~1, small biases."""
    if len(shape) == 1:
        if key.endswith(".weight"):  # norm scale
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)
