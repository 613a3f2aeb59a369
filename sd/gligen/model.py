"""GLIGEN's modules in MLX (parameter names as in the file: `fuser.*` per transformer block, `position_net.*`)
and the extras source that places them in the UNet forward."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from sd.models.ops import PLAIN, PlainOps
from sd.models.unet_blocks import LAYER_NORM_EPS, Attention, FeedForward
from sd.models.unet_extras import ModulePatch, Site, UNetExtras

MAX_OBJECTS = 30  # ComfyUI's Gligen.max_objs: the position net always sees 30 tokens
FOURIER_FREQS = 8  # PositionNet(fourier_freqs=8): 8 frequencies x (sin, cos) x 4 box coordinates
POSITION_DIM = FOURIER_FREQS * 2 * 4
POSITION_HIDDEN = 512
# ComfyUI: 8 heads for 768-wide box tokens (SD1.x); other widths are SD2.x files (64-wide heads there), whose
# text features no SD1.x text encoder gives: GLIGENTextBoxApply refuses them.
HEADS = 8

Box = tuple[mx.array, int, int, int, int]  # (pooled [1, C], h, w, y, x) in latent pixels, ComfyUI's order


def fourier_embedding(x: mx.array, freqs: int = FOURIER_FREQS, temperature: float = 100.0) -> mx.array:
    """[..., 4] -> [..., freqs * 2 * 4]: sin, then cos, of frequency temperature ** (i / freqs) times x."""
    bands = temperature ** (mx.arange(freqs, dtype=mx.float32) / freqs)
    parts = []
    for i in range(freqs):
        parts += [mx.sin(bands[i] * x), mx.cos(bands[i] * x)]
    return mx.concatenate(parts, axis=-1)


class GatedSelfAttentionDense(nn.Module):
    """The fuser after one transformer block's self-attention. Its attention attends over the image tokens
    and the box tokens together (projected by `linear` to the block's width); only the image tokens'
    outputs are kept. tanh(alpha) gates both residuals: alpha 0 leaves the block as it was."""

    def __init__(self, query_dim: int, key_dim: int, heads: int = HEADS):
        super().__init__()
        self.linear = nn.Linear(key_dim, query_dim)
        self.attn = Attention(query_dim, query_dim, heads, query_dim // heads)  # to_out.0 has a bias
        self.ff = FeedForward(query_dim)
        self.norm1 = nn.LayerNorm(query_dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(query_dim, eps=LAYER_NORM_EPS)
        self.alpha_attn = mx.array(0.0)
        self.alpha_dense = mx.array(0.0)

    @property
    def query_dim(self) -> int:
        return self.linear.weight.shape[0]

    def __call__(self, x: mx.array, objs: mx.array, ops: PlainOps = PLAIN) -> mx.array:
        n_visual = x.shape[1]
        objs = self.linear(objs.astype(x.dtype))
        objs = mx.broadcast_to(objs, (x.shape[0], *objs.shape[1:]))  # the same boxes for every sample
        joint = self.norm1(mx.concatenate([x, objs], axis=1))
        x = x + mx.tanh(self.alpha_attn).astype(x.dtype) * self.attn(joint, None, ops)[:, :n_visual]
        return x + mx.tanh(self.alpha_dense).astype(x.dtype) * self.ff(self.norm2(x), ops)


class PositionNet(nn.Module):
    """Boxes [B, N, 4] (x1, y1, x2, y2 in [0, 1]), masks [B, N] (1 = a box) and text features [B, N, in_dim]
    -> box tokens [B, N, out_dim]; masked-out slots take the learnt null features."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # indices 1 and 3 are SiLUs (not stored), as in the file's `linears.0/2/4`
        self.linears = [nn.Linear(in_dim + POSITION_DIM, POSITION_HIDDEN), nn.SiLU(),
                        nn.Linear(POSITION_HIDDEN, POSITION_HIDDEN), nn.SiLU(),
                        nn.Linear(POSITION_HIDDEN, out_dim)]
        self.null_positive_feature = mx.zeros((in_dim,))
        self.null_position_feature = mx.zeros((POSITION_DIM,))

    def __call__(self, boxes: mx.array, masks: mx.array, embeddings: mx.array) -> mx.array:
        dtype = self.linears[0].weight.dtype
        masks = masks[..., None].astype(dtype)
        xyxy = fourier_embedding(boxes).astype(dtype)
        embeddings = embeddings.astype(dtype) * masks + (1 - masks) * self.null_positive_feature
        xyxy = xyxy * masks + (1 - masks) * self.null_position_feature
        h = mx.concatenate([embeddings, xyxy], axis=-1)
        h = nn.silu(self.linears[0](h))
        h = nn.silu(self.linears[2](h))
        return self.linears[4](h)


class Gligen(nn.Module):
    """The position net and one fuser per UNet transformer block, in the order the forward meets them."""

    def __init__(self, fusers: Sequence[GatedSelfAttentionDense], position_net: PositionNet):
        super().__init__()
        self.fusers = list(fusers)
        self.position_net = position_net

    @property
    def key_dim(self) -> int:
        """The width of the text features a box carries (CLIP's pooled output: 768 in SD1.x)."""
        return self.position_net.null_positive_feature.shape[0]

    def objects(self, boxes: Sequence[Box], height: int, width: int) -> mx.array:
        """ComfyUI's Gligen.set_position: [1, 30, out_dim] box tokens for a latent of height x width (the
        crop one entry is evaluated on), corners as fractions of it."""
        if len(boxes) > MAX_OBJECTS:
            raise ValueError(f"GLIGEN takes at most {MAX_OBJECTS} boxes per conditioning, got {len(boxes)}")
        coords = [[x / width, y / height, (x + w) / width, (y + h) / height] for _, h, w, y, x in boxes]
        coords += [[0.0] * 4] * (MAX_OBJECTS - len(boxes))
        masks = mx.array([[1.0] * len(boxes) + [0.0] * (MAX_OBJECTS - len(boxes))])
        pooled = [p.reshape(1, -1).astype(mx.float32) for p, *_ in boxes]
        pooled.append(mx.zeros((MAX_OBJECTS - len(boxes), self.key_dim), dtype=mx.float32))
        return self.position_net(mx.array([coords], dtype=mx.float32), masks, mx.concatenate(pooled)[None])

    def middle_patch(self, x: mx.array, site: Site, objs: mx.array, ops: PlainOps | None = None) -> mx.array:
        """After a transformer block's self-attention (the UNet's `middle_patch`, as a ModulePatch)."""
        if site is None or site.ordinal >= len(self.fusers):
            raise ValueError(f"this GLIGEN model has {len(self.fusers)} gated attention blocks; the UNet has "
                             "more transformer blocks (a GLIGEN file for another model?)")
        fuser = self.fusers[site.ordinal]
        if fuser.query_dim != x.shape[-1]:
            raise ValueError(f"GLIGEN block {site.ordinal} is {fuser.query_dim} wide, the UNet's transformer "
                             f"block there {x.shape[-1]} (a GLIGEN file for another model?)")
        return fuser(x, objs, ops or PLAIN)


class GligenSource:
    """An extras source (sd/sampling/conds.py) for one conditioning entry's boxes: each UNet call gets the
    fusers as a `middle_patch`, fed the box tokens for the call's latent size (computed once per size). It is
    a ModulePatch, so FastUNet keeps the call compiled."""

    def __init__(self, gligen: Gligen, boxes: Sequence[Box]):
        self.gligen = gligen
        self.boxes = tuple(boxes)
        self._objects: dict[tuple[int, int], mx.array] = {}

    def objects(self, height: int, width: int) -> mx.array:
        objs = self._objects.get((height, width))
        if objs is None:
            objs = self._objects[(height, width)] = self.gligen.objects(self.boxes, height, width)
        return objs

    def unet_extras(self, x: mx.array, timestep, context, areas) -> UNetExtras:
        objs = self.objects(x.shape[1], x.shape[2])  # x is the call's NHWC input: crops of one size
        return UNetExtras(middle_patch=(ModulePatch(self.gligen, (objs,)),))
