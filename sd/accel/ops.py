"""The accelerated ops backend: sd/models/ops.py's methods computed faster, under the one forward.

`FastOps(options)` overrides `PlainOps`: 3x3 convs as im2col + one GEMM, GroupNorm from fp32 column sums,
q|k|v (self-attention) and k|v (cross-attention) projections as one GEMM each, and — through the
`for_step` hook — all ResBlocks' time-embedding projections and all cross-attentions' k|v as one GEMM per
UNet step each. Where they exist and apply, the C kernels of sd/accel/cpu_kernels.py (CPU, fp32) and the
CUDA kernels of sd/accel/cuda_kernels.py take the op instead. Which levers are on is `FastOptions`; the
defaults per device are `default_options` (each choice and the ones that lost: docs/performance.md).
Results equal the plain backend's to float rounding (tests/test_fp16_parity.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from sd.accel import cpu_kernels, cuda_kernels
from sd.models.ops import PlainOps, merge_heads, split_heads
from sd.models.unet_blocks import ResBlock, SpatialTransformer


@dataclass(frozen=True)
class FastOptions:
    compile: bool = True          # mx.compile the forward (sd/accel/compiled.py); not with cpu_kernels
    conv: str = "native"          # "native" (mx.conv2d) | "im2col" (3x3: one GEMM over 9 shifted copies)
    groupnorm: str = "library"    # "library" (nn.GroupNorm) | "colsum" (fp32 column sums over the pixels)
    fused_qkv: bool = False       # one GEMM for self-attention q|k|v, one for cross-attention k|v
    shared_projections: bool = False  # (with fused_qkv) one GEMM per step for all ResBlocks' time-embedding
                                      # projections and one for all cross-attentions' k|v (SD1.5: 22 + 16
                                      # small GEMMs -> 2)
    streams: int = 1              # >1 (CPU without the C kernels): attention's queries split over this many
                                  # CPU streams, since MLX's CPU softmax is single-threaded
    cuda_kernels: bool = False    # MLX CUDA: sd/accel/cuda_kernels.py's GroupNorm statistics, 160-wide
                                  # attention and, with conv="im2col", im2col (GroupNorm-apply + SiLU in)
    cpu_kernels: bool = False     # CPU, fp32: sd/accel/cpu_kernels.py's attention, GEGLU, GroupNorm(+SiLU)
                                  # and large 3x3 convs (they evaluate their inputs: no mx.compile)

    def with_(self, **changes) -> FastOptions:
        return replace(self, **changes)

    @property
    def compiles(self) -> bool:
        return self.compile and not self.cpu_kernels


def default_options(component: str, *, gpu: bool, cuda: bool = False,
                    cpu_kernels: bool = False) -> FastOptions:
    """The levers that paid for `component` ("unet" or "vae") on a device (docs/performance.md).

    GPU UNet: im2col 3x3 convs, fused and shared projections, column-sum GroupNorm under one mx.compile
    (with MLX's CUDA backend, `cuda`: the CUDA kernels too). GPU VAE: cuDNN convs (im2col's 9x-wide copies of
    its 128/256-channel 512x512 activations cost more than they save), column-sum GroupNorm. CPU: the C
    kernels with fused projections, uncompiled, where they build (`cpu_kernels`); else mx.compile and
    attention's queries over one CPU stream per core.
    """
    if gpu:
        if component == "unet":
            return FastOptions(conv="im2col", groupnorm="colsum", fused_qkv=True, shared_projections=True,
                               cuda_kernels=cuda)
        return FastOptions(groupnorm="colsum", cuda_kernels=cuda)
    if cpu_kernels:
        return FastOptions(compile=False, cpu_kernels=True, fused_qkv=True)
    return FastOptions(streams=max(1, min(os.cpu_count() or 1, 8)))


def options_here(component: str) -> FastOptions:
    """`default_options` for the default device of this process (compiling the CPU kernels if needed)."""
    from sd.accel import gpu_cache
    from sd.accel.precision import on_gpu

    gpu = on_gpu()
    gpu_cache.prepare()  # kernel folders private; says once when this GPU's kernels are not compiled yet
    return default_options(component, gpu=gpu, cuda=gpu and cuda_kernels.available(),
                           cpu_kernels=not gpu and cpu_kernels.available())


class FastOps(PlainOps):
    """`fused`: FusedProjections.weights() of the model (by attention module id, plus the shared stacks),
    passed per call so a compiled graph takes them as inputs; `layout`: where each module's rows are in the
    shared stacks."""

    def __init__(self, opts: FastOptions, fused: dict | None = None, layout: dict | None = None):
        self.opts = opts
        self.fused = fused or {}
        self.layout = layout
        self.kv: dict[int, tuple[mx.array, mx.array]] = {}
        self.offsets: dict[int, mx.array] = {}

    # ------------------------------------------------------------------------------------------ hooks
    def for_step(self, unet, emb: mx.array, context: mx.array) -> FastOps:
        step = FastOps(self.opts, self.fused, self.layout)
        if self.layout and "context_kv" in self.fused:
            kv = context @ self.fused["context_kv"].T                        # [B, L, sum of 2C]
            for key, (a, b) in self.layout["context_kv"].items():
                step.kv[key] = tuple(mx.split(kv[..., a:b], 2, axis=-1))
        if self.layout and "emb" in self.fused:
            e_t = self.fused["emb"] @ nn.silu(emb).T + self.fused["emb_bias"][:, None]   # [sum of C, B]
            step.offsets = {key: e_t[a:b] for key, (a, b) in self.layout["emb"].items()}
        return step

    def time_offset(self, res_block, emb: mx.array) -> mx.array:
        shared = self.offsets.get(id(res_block))
        if shared is not None:
            return shared
        lin = res_block.emb_layers[1]
        y = lin.weight @ nn.silu(emb).T
        return y + lin.bias[:, None] if "bias" in lin else y

    def projections(self, attn, x: mx.array, context: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
        kv = self.kv.get(id(attn))
        if kv is not None:
            return (x @ attn.to_q.weight.T, *kv)
        if not self.opts.fused_qkv:
            return super().projections(attn, x, context)
        fused = self.fused.get(id(attn))
        if context is None:
            w = fused if fused is not None else fuse_projections(attn, cross=False)
            return tuple(mx.split(x @ w.T, 3, axis=-1))
        w = fused if fused is not None else fuse_projections(attn, cross=True)
        return (x @ attn.to_q.weight.T, *mx.split(context @ w.T, 2, axis=-1))

    # -------------------------------------------------------------------------------------------- ops
    def _cpu_kernels(self, x: mx.array):
        """The C kernels when the options ask for them and x is fp32 on the CPU; else None (MLX's ops)."""
        if not self.opts.cpu_kernels or x.dtype != mx.float32:
            return None
        if mx.default_device().type != mx.DeviceType.cpu:
            return None
        return cpu_kernels if cpu_kernels.available() else None

    def _cuda_im2col(self, conv: nn.Conv2d, x: mx.array) -> bool:
        return (self.opts.cuda_kernels and self.opts.conv == "im2col" and _is_3x3_same(conv)
                and cuda_kernels.supported(x))

    def conv2d(self, conv: nn.Conv2d, x: mx.array) -> mx.array:
        w = conv.weight
        if self._cuda_im2col(conv, x):
            return cuda_kernels.conv3x3(conv, x)
        kernels = self._cpu_kernels(x)
        if (kernels and _is_3x3_same(conv) and x.shape[1] * x.shape[2] >= kernels.CONV_MIN_PIXELS
                and x.shape[-1] >= kernels.CONV_MIN_CHANNELS):
            return kernels.conv3x3(x, w, conv.get("bias"))
        if self.opts.conv == "im2col" and _is_3x3_same(conv):
            b, h, wd, c = x.shape
            xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
            cols = mx.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
            out = mx.addmm(conv.bias, cols.reshape(-1, 9 * c), w.reshape(w.shape[0], -1).T)
            return out.reshape(b, h, wd, -1)
        return super().conv2d(conv, x)

    def group_norm(self, norm: nn.GroupNorm, x: mx.array) -> mx.array:
        if self.opts.cuda_kernels and cuda_kernels.supported(x):
            return _apply_affine(x, *cuda_kernels.group_norm_affine(norm, x))
        kernels = self._cpu_kernels(x)
        if kernels and norm.pytorch_compatible:
            return kernels.group_norm(x, norm.num_groups, norm.get("weight"), norm.get("bias"), norm.eps)
        if self.opts.groupnorm == "colsum":
            return _colsum_group_norm(norm, x)
        return norm(x)

    def norm_silu_conv(self, norm: nn.GroupNorm, conv: nn.Conv2d, x: mx.array,
                       offset_t: mx.array | None = None) -> mx.array:
        if self._cuda_im2col(conv, x):  # statistics of x + offset without adding it; apply+SiLU in im2col
            scale, shift = cuda_kernels.group_norm_affine(norm, x, offset_t)
            return cuda_kernels.conv3x3(conv, x, scale, shift, silu=True)
        if offset_t is not None:
            x = x + offset_t.T.reshape(offset_t.shape[1], *(1,) * (x.ndim - 2), offset_t.shape[0])
        kernels = self._cpu_kernels(x)
        if kernels and norm.pytorch_compatible:
            y = kernels.group_norm(x, norm.num_groups, norm.get("weight"), norm.get("bias"), norm.eps,
                                   silu=True)
            return self.conv2d(conv, y)
        return self.conv2d(conv, nn.silu(self.group_norm(norm, x)))

    def attention(self, q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float) -> mx.array:
        kernels = self._cpu_kernels(q)
        if kernels:  # reads q/k/v in place (also strided thirds of a fused buffer), no head transposes
            return kernels.attention(q, k, v, heads, scale)
        if self.opts.cuda_kernels and cuda_kernels.attention_supported(q, k, heads):  # heads cuDNN lacks
            return cuda_kernels.attention(q, k, v, heads, scale)
        qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
        length = qh.shape[2]
        if self.opts.streams > 1 and length >= 256:
            step = -(-length // self.opts.streams)
            parts = []
            for i, stream in zip(range(0, length, step), _cpu_streams(self.opts.streams), strict=False):
                with mx.stream(stream):
                    part = mx.fast.scaled_dot_product_attention(qh[:, :, i:i + step], kh, vh, scale=scale)
                    parts.append(part)
            return merge_heads(mx.concatenate(parts, axis=2))
        return merge_heads(mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=scale))

    def geglu(self, h: mx.array) -> mx.array:
        kernels = self._cpu_kernels(h)
        return kernels.geglu(h) if kernels else super().geglu(h)


def _is_3x3_same(conv: nn.Conv2d) -> bool:
    return conv.weight.shape[1] == 3 and conv.stride == (1, 1) and conv.padding == (1, 1)


def _colsum_group_norm(norm: nn.GroupNorm, x: mx.array) -> mx.array:
    """GroupNorm from fp32 per-channel sums of x and x^2 over the pixels, then summed per group."""
    b, c, g = x.shape[0], x.shape[-1], norm.num_groups
    xf = x.reshape(b, -1, c).astype(mx.float32)
    n = xf.shape[1] * (c // g)
    mean = xf.sum(axis=1).reshape(b, g, c // g).sum(axis=-1) / n
    var = mx.maximum(mx.square(xf).sum(axis=1).reshape(b, g, c // g).sum(axis=-1) / n - mean * mean, 0.0)
    scale = mx.repeat(mx.rsqrt(var + norm.eps), c // g, axis=1) * norm.weight.astype(mx.float32)   # (b, c)
    shift = norm.bias.astype(mx.float32) - mx.repeat(mean, c // g, axis=1) * scale
    return _apply_affine(x, scale, shift)


def _apply_affine(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """x * scale + shift with per-(batch, channel) scale/shift [b, c] float32, broadcast over the pixels."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    # in fp32 (fused into one elementwise kernel under compile): in half precision, x*scale and shift can be
    # large and cancel, and rounding them to bf16 first costs ~1e-2 relative
    return (x.astype(mx.float32) * scale.reshape(shape) + shift.reshape(shape)).astype(x.dtype)


_STREAMS: list = []  # CPU streams are a process resource MLX never frees: made once, reused


def _cpu_streams(n: int) -> list:
    while len(_STREAMS) < n:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[:n]


# ---------------------------------------------------------------------------------- fused weights
def fuse_projections(attn, cross: bool) -> mx.array:
    """One weight for the projections that read the same input: q|k|v (self-attention) or k|v (cross)."""
    parts = (attn.to_k, attn.to_v) if cross else (attn.to_q, attn.to_k, attn.to_v)
    return mx.concatenate([p.weight for p in parts], axis=0)


class FusedProjections:
    """A UNet's fused projection weights, concatenated once and again only when one of their arrays is
    replaced (a LoRA patch, new weights): concatenating inside every step cost one copy kernel per weight per
    step (80 of a step's ~1000 kernels on the H100). Per attention module: q|k|v (self) or k|v (cross). With
    `shared`: every cross-attention's k|v stacked into one weight (they all read the text context) and every
    ResBlock's time-embedding projection stacked into another (they all read the time embedding), so each set
    is one GEMM per step; `layout` maps id(module) to its row range in the stacked weight."""

    def __init__(self, unet, shared: bool = False):
        blocks = [blk for _, m in unet.named_modules() if isinstance(m, SpatialTransformer)
                  for blk in m.transformer_blocks]
        # attentions with hypernetworks project their own k/v inputs, unfused (sd/models/unet_blocks.py)
        self.modules = [(attn, cross) for cross in (False, True) for blk in blocks
                        if "kv_patches" not in (attn := blk.attn2 if cross else blk.attn1)]
        self.shared = shared
        self.res_blocks = [m for _, m in unet.named_modules() if isinstance(m, ResBlock)] if shared else []
        self.layout: dict[str, dict[int, tuple[int, int]]] = {"context_kv": {}, "emb": {}}
        if shared:
            self.layout["context_kv"] = _row_ranges((id(m), 2 * m.to_k.weight.shape[0])
                                                    for m, cross in self.modules if cross)
            self.layout["emb"] = _row_ranges((id(rb), rb.emb_layers[1].weight.shape[0])
                                             for rb in self.res_blocks)
        self._key: tuple = ()
        self._weights: dict = {}

    def _sources(self) -> list[mx.array]:
        arrays = [p.weight for m, _ in self.modules for p in (m.to_q, m.to_k, m.to_v)]
        for rb in self.res_blocks:
            lin = rb.emb_layers[1]
            arrays += [lin.weight] + ([lin.bias] if "bias" in lin else [])
        return arrays

    def weights(self) -> dict:
        key = tuple(id(a) for a in self._sources())
        if key != self._key:
            self._weights = self._build()
            self._key = key
        return self._weights

    def _build(self) -> dict:
        shared_cross = self.shared and any(cross for _, cross in self.modules)
        w: dict = {id(m): fuse_projections(m, cross) for m, cross in self.modules
                   if not (cross and shared_cross)}
        if shared_cross:
            w["context_kv"] = mx.concatenate([fuse_projections(m, True)
                                              for m, cross in self.modules if cross])
        if self.res_blocks:
            lins = [rb.emb_layers[1] for rb in self.res_blocks]
            w["emb"] = mx.concatenate([lin.weight for lin in lins])
            w["emb_bias"] = mx.concatenate([lin.bias if "bias" in lin else mx.zeros((lin.weight.shape[0],),
                                                                                    lin.weight.dtype)
                                            for lin in lins])
        mx.eval(w)
        return w


def _row_ranges(sizes) -> dict[int, tuple[int, int]]:
    out, start = {}, 0
    for key, n in sizes:
        out[key] = (start, start + n)
        start += n
    return out
