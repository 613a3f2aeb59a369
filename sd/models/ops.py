"""The ops a model forward is written in, as plain MLX: the reference backend.

Every forward in sd/models (UNet, VAE) calls these instead of spelling the computation inline, so that one
forward serves every device: an accelerated backend (sd/accel/ops.py) overrides the same methods with
kernels, fused projections and im2col convs, and is tested against this one. Arguments are the modules
themselves (a conv, a GroupNorm, an attention) so a backend can read their weights in whatever form it
wants; arrays are NHWC / [batch, tokens, channels].

Two methods are hooks for work that spans blocks: `for_step` (called once per UNet forward, before any
block) lets a backend compute what many blocks share — all ResBlocks' time-embedding projections read the
same embedding, all cross-attentions' k/v the same text — and hand it back through `time_offset` and
`projections`. The plain backend computes each where it is asked.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class PlainOps:
    """Stateless; `PLAIN` is the instance the modules default to."""

    def for_step(self, unet, emb: mx.array, context: mx.array) -> PlainOps:
        """The ops for one UNet forward with this time embedding and text context."""
        return self

    def conv2d(self, conv: nn.Conv2d, x: mx.array) -> mx.array:
        weight = conv.weight
        if weight.shape[1] == weight.shape[2] == 1 and conv.stride == (1, 1) and conv.padding == (0, 0):
            # a 1x1 conv is one GEMM over the channel axis in NHWC; (O,1,1,I) -> (O,I) is a free reshape
            w2 = weight.reshape(weight.shape[0], -1).T
            return mx.addmm(conv.bias, x, w2) if "bias" in conv else x @ w2
        return conv(x)

    def group_norm(self, norm: nn.GroupNorm, x: mx.array) -> mx.array:
        return norm(x)

    def norm_silu_conv(self, norm: nn.GroupNorm, conv: nn.Conv2d, x: mx.array,
                       offset_t: mx.array | None = None) -> mx.array:
        """conv(silu(group_norm(x + offset))): the ResBlock / output pattern. `offset_t` is a per-(batch,
        channel) offset stored channel-major, [C, B] (a ResBlock's time-embedding projection, see
        `time_offset`), broadcast over the pixels."""
        if offset_t is not None:
            x = x + offset_t.T.reshape(offset_t.shape[1], *(1,) * (x.ndim - 2), offset_t.shape[0])
        return self.conv2d(conv, nn.silu(self.group_norm(norm, x)))

    def time_offset(self, res_block, emb: mx.array) -> mx.array:
        """A ResBlock's projection of the time embedding, [C, B] (channel-major: one channel range of a
        projection shared by many blocks is then a contiguous slice)."""
        return res_block.emb_layers[1](nn.silu(emb)).T

    def projections(self, attn, x: mx.array, context: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v of an attention module (no bias, as in LDM); `context` None means self-attention."""
        source = x if context is None else context
        return x @ attn.to_q.weight.T, source @ attn.to_k.weight.T, source @ attn.to_v.weight.T

    def attention(self, q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float) -> mx.array:
        """softmax(scale q k^T) v per head: q [B, Lq, heads*D], k/v [B, Lk, heads*D] -> [B, Lq, heads*D]."""
        out = mx.fast.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                                   split_heads(v, heads), scale=scale)
        return merge_heads(out)

    def geglu(self, h: mx.array) -> mx.array:
        """value * gelu(gate) of a feed-forward projection h = [value | gate] (exact GELU)."""
        value, gate = mx.split(h, 2, axis=-1)
        return value * nn.gelu(gate)


def split_heads(t: mx.array, heads: int) -> mx.array:
    batch, length, inner = t.shape
    return t.reshape(batch, length, heads, inner // heads).transpose(0, 2, 1, 3)


def merge_heads(t: mx.array) -> mx.array:
    batch, _, length, _ = t.shape
    return t.transpose(0, 2, 1, 3).reshape(batch, length, -1)


def upsample_nearest_2x(x: mx.array) -> mx.array:
    """Each pixel broadcast to a 2x2 patch: one materialisation, no gather."""
    b, h, w, c = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, h * 2, w * 2, c)


PLAIN = PlainOps()
