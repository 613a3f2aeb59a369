"""Building blocks of the SD1.x UNet (LDM `openaimodel` / `attention` modules), NHWC, in MLX.

Attribute names and list indices reproduce the checkpoint's key names (`in_layers.2`, `out_layers.3`,
`ff.net.0.proj`, `to_out.0`, ...): parameter-free layers (SiLU, Dropout) are not stored, so index gaps
are kept by calling the stored layers by their index. Every block takes `(x, emb, context, ops)` so the UNet
can run a block's layers in one loop; `ops` (sd/models/ops.py) computes the convolutions, norms, projections
and attention, plainly or accelerated.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from sd.models.ops import PLAIN, PlainOps, upsample_nearest_2x
from sd.models.unet_extras import NO_EXTRAS, AttentionFn, Site, UNetExtras

# LDM's GroupNorm32 uses 32 groups everywhere; ResBlocks use eps 1e-5, SpatialTransformer's norm 1e-6.
RESBLOCK_NORM_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5


def group_norm(groups: int, channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, plus the projected timestep embedding, GroupNorm-SiLU-Conv, residual."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = [group_norm(groups, in_channels, RESBLOCK_NORM_EPS), nn.SiLU(),
                          nn.Conv2d(in_channels, out_channels, 3, padding=1)]
        self.emb_layers = [nn.SiLU(), nn.Linear(emb_dim, out_channels)]
        # index 2 is Dropout in LDM: kept as Identity so the conv stays at index 3
        self.out_layers = [group_norm(groups, out_channels, RESBLOCK_NORM_EPS), nn.SiLU(), nn.Identity(),
                           nn.Conv2d(out_channels, out_channels, 3, padding=1)]
        if in_channels != out_channels:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, emb: mx.array, context: mx.array | None = None,
                 ops: PlainOps = PLAIN) -> mx.array:
        h = ops.norm_silu_conv(self.in_layers[0], self.in_layers[2], x)
        h = ops.norm_silu_conv(self.out_layers[0], self.out_layers[3], h, offset_t=ops.time_offset(self, emb))
        skip = ops.conv2d(self.skip_connection, x) if "skip_connection" in self else x
        return skip + h


class Attention(nn.Module):
    """Multi-head attention; `context` None means self-attention. q/k/v have no bias, as in LDM."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim)]

    def __call__(self, x: mx.array, context: mx.array | None = None, ops: PlainOps = PLAIN,
                 replace: AttentionFn | None = None) -> mx.array:
        """`replace(q, k, v, heads, scale)`, when given, computes the attention instead (unet_extras.py)."""
        if "kv_patches" in self:  # hypernetworks (sd/hypernetwork): k and v read their own inputs
            q, k, v = self._patched_projections(x, context)
        else:
            q, k, v = ops.projections(self, x, context)
        attend = replace or ops.attention
        return self.to_out[0](attend(q, k, v, self.heads, self.scale))

    def _patched_projections(self, x: mx.array, context: mx.array | None,
                             ) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v with each patch applied in order to the k and v inputs (ComfyUI's attn1/attn2 patches).
        Unfused in every backend: a backend's shared or fused k|v projections assume one input."""
        k_in = v_in = x if context is None else context
        for patch in self.kv_patches:
            k_in, v_in = patch(k_in, v_in)
        return x @ self.to_q.weight.T, k_in @ self.to_k.weight.T, v_in @ self.to_v.weight.T


class GEGLU(nn.Module):
    """Linear to twice the width; the second half, through exact GELU, gates the first."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is Dropout in LDM
        self.net = [GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        return self.net[2](self.net[0](x, ops))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def __call__(self, x: mx.array, context: mx.array, ops: PlainOps = PLAIN,
                 extras: UNetExtras = NO_EXTRAS, site: Site | None = None) -> mx.array:
        replace = None
        if site is not None and extras.attn1_replace:  # a (block, index) key covers all depths (ComfyUI)
            replace = (extras.attn1_replace.get((site.block, site.index, site.depth))
                       or extras.attn1_replace.get((site.block, site.index)))
        x = x + self.attn1(self.norm1(x), None, ops, replace)
        for patch in extras.middle_patch:
            x = patch(x, site)
        x = x + self.attn2(self.norm2(x), context, ops)
        return x + self.ff(self.norm3(x), ops)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the h*w tokens, 1x1 conv out, residual (SD1.x)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        head_dim = channels // heads
        self.norm = group_norm(groups, channels, TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = [BasicTransformerBlock(channels, context_dim, heads, head_dim)
                                   for _ in range(depth)]
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def __call__(self, x: mx.array, emb: mx.array | None = None, context: mx.array | None = None,
                 ops: PlainOps = PLAIN, extras: UNetExtras = NO_EXTRAS, site: Site | None = None) -> mx.array:
        """`site` (depth 0, ordinal of the first block) places `extras`' patches; see unet_extras.py."""
        batch, height, width, channels = x.shape
        h = ops.conv2d(self.proj_in, ops.group_norm(self.norm, x)).reshape(batch, height * width, channels)
        for depth, block in enumerate(self.transformer_blocks):
            at = Site(site.block, site.index, depth, site.ordinal + depth) if site else None
            h = block(h, context, ops, extras, at)
        h = ops.conv2d(self.proj_out, h.reshape(batch, height, width, channels))
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (key `op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x: mx.array, emb: mx.array | None = None, context: mx.array | None = None,
                 ops: PlainOps = PLAIN) -> mx.array:
        return ops.conv2d(self.op, x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (key `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, emb: mx.array | None = None, context: mx.array | None = None,
                 ops: PlainOps = PLAIN, output_hw: tuple[int, int] | None = None) -> mx.array:
        height, width = x.shape[1:3]
        x = upsample_nearest_2x(x)
        if output_hw is not None and output_hw != (height * 2, width * 2):
            # An odd-sized skip (stride-2 convs round up): nearest resize to 2n-1 picks the same source
            # pixels as cropping the 2x result, which is what ComfyUI/diffusers' interpolate(size=...) does.
            x = x[:, : output_hw[0], : output_hw[1], :]
        return ops.conv2d(self.conv, x)
