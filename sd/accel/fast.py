"""Optimised inference paths for the UNet and the VAE decoder, over the *same* modules and weights.

`FastUNet(unet)` / `FastVAEDecoder(vae)` run the computation of `sd.models.unet.UNetModel.__call__` /
`sd.models.vae.AutoencoderKL.decode` as one `mx.compile`d graph (GroupNorm + SiLU, residual adds, GEGLU and the
time-embedding broadcasts fuse into few kernels), reading the modules' parameters at call time, so LoRA
patches or reloaded weights are picked up (the compiled graph takes the parameters as inputs, not
constants). `FastOptions` holds the levers measured by `bench/levers.py`; the defaults are the ones that
paid on the H100 (see BENCHMARKS.md). On the CPU, attention is computed in query chunks (bounded memory), or,
with `cpu_kernels` (the CPU default where they build), attention, GEGLU, GroupNorm(+SiLU) and large 3x3
convs run as the C kernels of sd/accel/cpu_kernels.py, evaluated eagerly (not under mx.compile).

Outputs match the plain modules' to float rounding (tests/test_fp16_parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from sd.accel import cuda_kernels
from sd.models.unet import timestep_embedding
from sd.models.unet_blocks import Downsample, ResBlock, SpatialTransformer, Upsample


@dataclass(frozen=True)
class FastOptions:
    compile: bool = True
    conv: str = "native"          # "native" (mx.conv2d) | "im2col" (one GEMM over 9 shifted copies)
    groupnorm: str = "library"    # "library" (nn.GroupNorm) | "colsum" (fp32 column sums over pixels, then
                                  # groups) | "two_stage" (sums over each group's channels, then pixels)
    attention: str = "sdpa"       # "sdpa" | "manual" (matmul-softmax-matmul) | "auto" (manual where SDPA
                                  # lacks a fused kernel)
    fused_qkv: bool = False       # one matmul for self-attention q/k/v, one for cross-attention k/v
    attn_chunk: int = 0           # >0: split queries into chunks of this many tokens (bounds memory)
    streams: int = 1              # >1 (CPU): split attention's queries over this many CPU streams (threads);
                                  # MLX's CPU softmax is single-threaded, so this puts the other cores to work
    batch_streams: int = 1        # >1 (CPU): run batch slices (e.g. CFG's cond / uncond) on their own CPU
                                  # streams, so single-threaded element-wise ops run side by side
    cuda_kernels: bool = False    # MLX CUDA: sd/accel/cuda_kernels.py's GroupNorm statistics kernel; with
                                  # conv="im2col" also its im2col kernel (GroupNorm-apply + SiLU fused in)
    cpu_kernels: bool = False     # CPU, fp32: attention, GEGLU, GroupNorm(+SiLU) and large 3x3 convs as
                                  # sd/accel/cpu_kernels.py's C kernels (they evaluate their inputs, so
                                  # FastUNet/FastVAEDecoder then do not mx.compile)
    shared_projections: bool = False  # (with fused_qkv) one GEMM per step for all ResBlocks' time-embedding
                                      # projections and one for all cross-attentions' k|v: each set reads
                                      # the same input (22 + 16 small GEMMs -> 2 in SD1.5)

    def with_(self, **changes) -> FastOptions:
        return replace(self, **changes)


# Head sizes MLX's fused SDPA kernels cover (others fall back to a composed path).
_SDPA_FUSED_HEAD_DIMS = (64, 80, 128)


def _cpu_kernels(opts: FastOptions, x: mx.array):
    """The sd.accel.cpu_kernels module when opts asks for it and x is fp32 on the CPU; else None (MLX's ops)."""
    if not opts.cpu_kernels or x.dtype != mx.float32 or mx.default_device().type != mx.DeviceType.cpu:
        return None
    from sd.accel import cpu_kernels

    return cpu_kernels if cpu_kernels.available() else None


def _cuda_im2col(conv: nn.Conv2d, x: mx.array, opts: FastOptions, stride: int = 1, padding: int = 1) -> bool:
    """Whether a 3x3 stride-1 conv of x runs as sd/accel/cuda_kernels.py's im2col kernel + one GEMM."""
    return (opts.cuda_kernels and opts.conv == "im2col" and conv.weight.shape[1] == 3 and stride == 1
            and padding == 1 and cuda_kernels.supported(x))


# ---------------------------------------------------------------------------------------------- ops
def conv2d(conv: nn.Conv2d, x: mx.array, opts: FastOptions, stride: int = 1, padding: int = 1) -> mx.array:
    w = conv.weight
    if _cuda_im2col(conv, x, opts, stride, padding):
        return cuda_kernels.conv3x3(conv, x)
    kernels = _cpu_kernels(opts, x)
    if (kernels and w.shape[1] == w.shape[2] == 3 and stride == 1 and padding == 1
            and x.shape[1] * x.shape[2] >= kernels.CONV_MIN_PIXELS
            and x.shape[-1] >= kernels.CONV_MIN_CHANNELS):
        return kernels.conv3x3(x, w, conv.get("bias"))
    if opts.conv == "im2col" and w.shape[1] == 3 and stride == 1 and padding == 1:
        b, h, wd, c = x.shape
        xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        cols = mx.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
        out = mx.addmm(conv.bias, cols.reshape(-1, 9 * c), w.reshape(w.shape[0], -1).T)
        return out.reshape(b, h, wd, -1)
    if w.shape[1] == 1 and w.shape[2] == 1 and stride == 1:
        return mx.addmm(conv.bias, x, w.reshape(w.shape[0], -1).T)
    y = mx.conv2d(x, w, stride=stride, padding=padding)
    return y + conv.bias


def _affine_from_stats(gn: nn.GroupNorm, x: mx.array, mean: mx.array, var: mx.array) -> mx.array:
    """mean/var [b, g] float32 -> GroupNorm output; one fused multiply-add per element."""
    c, g = x.shape[-1], gn.num_groups
    scale = mx.rsqrt(var + gn.eps)
    scale_c = mx.repeat(scale, c // g, axis=1) * gn.weight.astype(mx.float32)   # (b, c)
    shift_c = gn.bias.astype(mx.float32) - mx.repeat(mean, c // g, axis=1) * scale_c
    return _apply_affine(x, scale_c, shift_c)


def _apply_affine(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """x * scale + shift with per-(batch, channel) scale/shift [b, c] float32, broadcast over the pixels."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    # in fp32 (fused into one elementwise kernel under compile): in half precision, x*scale and shift can be
    # large and cancel, and rounding them to bf16 first costs ~1e-2 relative
    return (x.astype(mx.float32) * scale.reshape(shape) + shift.reshape(shape)).astype(x.dtype)


def group_norm(gn: nn.GroupNorm, x: mx.array, opts: FastOptions) -> mx.array:
    if opts.cuda_kernels and cuda_kernels.supported(x):
        return _apply_affine(x, *cuda_kernels.group_norm_affine(gn, x))
    kernels = _cpu_kernels(opts, x)
    if kernels and gn.pytorch_compatible:
        return kernels.group_norm(x, gn.num_groups, gn.get("weight"), gn.get("bias"), gn.eps)
    if opts.groupnorm == "colsum":
        b, c, g = x.shape[0], x.shape[-1], gn.num_groups
        xf = x.reshape(b, -1, c).astype(mx.float32)
        n = xf.shape[1] * (c // g)
        s1 = xf.sum(axis=1).reshape(b, g, c // g).sum(axis=-1)
        s2 = mx.square(xf).sum(axis=1).reshape(b, g, c // g).sum(axis=-1)
        mean = s1 / n
        return _affine_from_stats(gn, x, mean, mx.maximum(s2 / n - mean * mean, 0.0))
    if opts.groupnorm == "two_stage":
        b, c, g = x.shape[0], x.shape[-1], gn.num_groups
        xf = x.reshape(b, -1, g, c // g).astype(mx.float32)
        n = xf.shape[1] * xf.shape[3]
        s1 = xf.sum(axis=3).sum(axis=1)                     # (b, g)
        s2 = mx.square(xf).sum(axis=3).sum(axis=1)
        mean = s1 / n
        return _affine_from_stats(gn, x, mean, mx.maximum(s2 / n - mean * mean, 0.0))
    return gn(x)


def norm_silu_conv(gn: nn.GroupNorm, conv: nn.Conv2d, x: mx.array, opts: FastOptions,
                   offset_t: mx.array | None = None) -> mx.array:
    """conv(silu(group_norm(x + offset))) with offset_t = offset transposed, [C, B] (e.g. a ResBlock's time
    embedding, broadcast over the pixels; channel-major so that one channel range of a shared projection is
    a contiguous slice): the ResBlock / UNet-output / VAE pattern, in one place so a backend's fused kernel
    can take all of it."""
    if _cuda_im2col(conv, x, opts):
        scale, shift = cuda_kernels.group_norm_affine(gn, x, offset_t)
        return cuda_kernels.conv3x3(conv, x, scale, shift, silu=True)
    if offset_t is not None:
        x = x + offset_t.T.reshape(offset_t.shape[1], *(1,) * (x.ndim - 2), offset_t.shape[0])
    kernels = _cpu_kernels(opts, x)
    if kernels and gn.pytorch_compatible:
        y = kernels.group_norm(x, gn.num_groups, gn.get("weight"), gn.get("bias"), gn.eps, silu=True)
        return conv2d(conv, y, opts)
    return conv2d(conv, nn.silu(group_norm(gn, x, opts)), opts)


def _attention_core(q: mx.array, k: mx.array, v: mx.array, scale: float, opts: FastOptions) -> mx.array:
    """q [B,H,Lq,D], k/v [B,H,Lk,D] -> [B,H,Lq,D]."""
    d = q.shape[-1]
    manual = opts.attention == "manual" or (opts.attention == "auto" and d not in _SDPA_FUSED_HEAD_DIMS)

    def one(qc):
        if manual:
            s = (qc * mx.array(scale, qc.dtype)) @ k.swapaxes(-1, -2)
            return mx.softmax(s, axis=-1, precise=True) @ v
        return mx.fast.scaled_dot_product_attention(qc, k, v, scale=scale)

    length = q.shape[2]
    if opts.streams > 1 and length >= 256:
        step = -(-length // opts.streams)
        parts = []
        for i, stream in zip(range(0, length, step), _cpu_streams(opts.streams), strict=False):
            with mx.stream(stream):
                parts.append(one(q[:, :, i:i + step]))
        return mx.concatenate(parts, axis=2)
    if opts.attn_chunk and length > opts.attn_chunk:
        step = opts.attn_chunk
        return mx.concatenate([one(q[:, :, i:i + step]) for i in range(0, length, step)], axis=2)
    return one(q)


_STREAMS: list = []


def _cpu_streams(n: int) -> list:
    while len(_STREAMS) < n:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[:n]


def _heads(t: mx.array, heads: int) -> mx.array:
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(0, 2, 1, 3)


def attention(attn, x: mx.array, context: mx.array | None, opts: FastOptions,
              fused: mx.array | None = None, kv: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """sd.models.unet_blocks.Attention's computation (no q/k/v bias). `fused`: the module's q|k|v (self-attention) or
    k|v (cross-attention) weights already concatenated (see FusedProjections); `kv`: cross-attention's k and v
    already projected (by a shared GEMM)."""
    heads = attn.heads
    if kv is not None:
        q, (k, v) = x @ attn.to_q.weight.T, kv
    elif opts.fused_qkv and context is None:
        w = fused if fused is not None else fuse_projections(attn, cross=False)
        q, k, v = mx.split(x @ w.T, 3, axis=-1)
    elif opts.fused_qkv:
        q = x @ attn.to_q.weight.T
        w = fused if fused is not None else fuse_projections(attn, cross=True)
        k, v = mx.split(context @ w.T, 2, axis=-1)
    else:
        ctx = x if context is None else context
        q, k, v = x @ attn.to_q.weight.T, ctx @ attn.to_k.weight.T, ctx @ attn.to_v.weight.T
    kernels = _cpu_kernels(opts, x)
    if kernels:  # reads q/k/v in place (also strided thirds of the fused buffer), no head transposes
        out = kernels.attention(q, k, v, heads, attn.scale)
    elif opts.cuda_kernels and cuda_kernels.attention_supported(q, k, heads):  # heads cuDNN lacks (160 wide)
        out = cuda_kernels.attention(q, k, v, heads, attn.scale)
    else:
        out = _attention_core(_heads(q, heads), _heads(k, heads), _heads(v, heads), attn.scale, opts)
        b, _, n, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, n, -1)
    return attn.to_out[0](out)


def fuse_projections(attn, cross: bool) -> mx.array:
    """One weight for the projections that read the same input: q|k|v (self-attention) or k|v (cross)."""
    parts = (attn.to_k, attn.to_v) if cross else (attn.to_q, attn.to_k, attn.to_v)
    return mx.concatenate([p.weight for p in parts], axis=0)


class FusedProjections:
    """The fused projection weights of a UNet, concatenated once and again only when one of their arrays is
    replaced (a LoRA patch, new weights): concatenating inside every step cost one copy kernel per weight per
    step (80 of a step's ~1000 kernels on the H100). Per attention module: q|k|v (self) or k|v (cross). With
    `shared`: every cross-attention's k|v stacked into one weight (they all read the text context) and every
    ResBlock's time-embedding projection stacked into another (they all read the time embedding), so each set
    is one GEMM per step; `layout` maps id(module) to its row range in the stacked weight."""

    def __init__(self, unet, shared: bool = False):
        blocks = _transformer_blocks(unet)
        self.modules = [(blk.attn1, False) for blk in blocks] + [(blk.attn2, True) for blk in blocks]
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


def _transformer_blocks(unet) -> list:
    return [blk for _, m in unet.named_modules() if isinstance(m, SpatialTransformer)
            for blk in m.transformer_blocks]


class _Shared:
    """What one UNet step computes once for many blocks: the fused weights (by module id), cross-attention k/v
    and ResBlock time-embedding offsets from the shared GEMMs (by module id)."""

    def __init__(self, fused: dict, layout: dict | None, context: mx.array, emb: mx.array):
        self.fused = fused
        self.kv: dict[int, tuple[mx.array, mx.array]] = {}
        self.offsets: dict[int, mx.array] = {}
        if layout and "context_kv" in fused:
            kv = context @ fused["context_kv"].T                        # [B, L, sum of 2C]
            for key, (a, b) in layout["context_kv"].items():
                self.kv[key] = tuple(mx.split(kv[..., a:b], 2, axis=-1))
        if layout and "emb" in fused:
            e_t = fused["emb"] @ nn.silu(emb).T + fused["emb_bias"][:, None]   # [sum of C, B]
            self.offsets = {key: e_t[a:b] for key, (a, b) in layout["emb"].items()}


# --------------------------------------------------------------------------------------------- UNet
def _emb_offset_t(blk: ResBlock, emb: mx.array) -> mx.array:
    """The ResBlock's time-embedding projection, transposed: [C, B]."""
    lin = blk.emb_layers[1]
    y = lin.weight @ nn.silu(emb).T
    return y + lin.bias[:, None] if "bias" in lin else y


def _res_block(blk: ResBlock, x: mx.array, emb: mx.array, opts: FastOptions,
               offset_t: mx.array | None = None) -> mx.array:
    """offset_t: the block's time-embedding projection [C, B] when computed by a shared GEMM."""
    h = norm_silu_conv(blk.in_layers[0], blk.in_layers[2], x, opts)
    offset_t = _emb_offset_t(blk, emb) if offset_t is None else offset_t
    h = norm_silu_conv(blk.out_layers[0], blk.out_layers[3], h, opts, offset_t=offset_t)
    skip = conv2d(blk.skip_connection, x, opts, padding=0) if "skip_connection" in blk else x
    return skip + h


def _transformer(st: SpatialTransformer, x: mx.array, context: mx.array, opts: FastOptions,
                 shared: _Shared) -> mx.array:
    b, hh, ww, c = x.shape
    h = conv2d(st.proj_in, group_norm(st.norm, x, opts), opts, padding=0).reshape(b, hh * ww, c)
    for blk in st.transformer_blocks:
        a1, a2 = blk.attn1, blk.attn2
        h = h + attention(a1, blk.norm1(h), None, opts, shared.fused.get(id(a1)))
        h = h + attention(a2, blk.norm2(h), context, opts, shared.fused.get(id(a2)), shared.kv.get(id(a2)))
        h = h + blk.ff.net[2](_geglu(blk.ff.net[0].proj(blk.norm3(h)), opts))
    return x + conv2d(st.proj_out, h.reshape(b, hh, ww, c), opts, padding=0)


def _geglu(h: mx.array, opts: FastOptions) -> mx.array:
    """value * gelu(gate) of the feed-forward's projection h = [value | gate]."""
    kernels = _cpu_kernels(opts, h)
    if kernels:
        return kernels.geglu(h)
    value, gate = mx.split(h, 2, axis=-1)
    return value * nn.gelu(gate)


def _upsample2x(x: mx.array) -> mx.array:
    b, h, w, c = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, h * 2, w * 2, c)


def _layer(layer, h: mx.array, emb: mx.array, context: mx.array, opts: FastOptions, shared: _Shared,
           output_hw: tuple[int, int] | None = None) -> mx.array:
    if isinstance(layer, ResBlock):
        return _res_block(layer, h, emb, opts, shared.offsets.get(id(layer)))
    if isinstance(layer, SpatialTransformer):
        return _transformer(layer, h, context, opts, shared)
    if isinstance(layer, Downsample):
        return conv2d(layer.op, h, opts, stride=2, padding=1)
    if isinstance(layer, Upsample):
        up = _upsample2x(h)
        if output_hw is not None and output_hw != tuple(up.shape[1:3]):
            up = up[:, : output_hw[0], : output_hw[1], :]  # an odd-sized skip: crop, as UNetModel does
        return conv2d(layer.conv, up, opts)
    return layer(h, emb, context)


def unet_forward(unet, x: mx.array, timesteps: mx.array, context: mx.array, opts: FastOptions,
                 fused: dict | None = None, layout: dict | None = None) -> mx.array:
    """The computation of UNetModel.__call__, with the optimised ops. `fused`: FusedProjections.weights()
    (by attention module id, and the shared stacks), else projections are concatenated here; `layout`: its
    FusedProjections.layout (where each module's rows are in the shared stacks)."""
    dtype = unet.time_embed[0].weight.dtype
    t_emb = timestep_embedding(timesteps, unet.config.model_channels).astype(dtype)
    emb = unet.time_embed[2](nn.silu(unet.time_embed[0](t_emb)))
    context = context.astype(dtype)
    shared = _Shared(fused or {}, layout, context, emb)
    h = conv2d(unet.input_blocks[0][0], x.astype(dtype), opts)
    skips = [h]
    for block in unet.input_blocks[1:]:
        for layer in block:
            h = _layer(layer, h, emb, context, opts, shared)
        skips.append(h)
    for layer in unet.middle_block:
        h = _layer(layer, h, emb, context, opts, shared)
    for block in unet.output_blocks:
        h = mx.concatenate([h, skips.pop()], axis=-1)
        for layer in block:
            hw = tuple(skips[-1].shape[1:3]) if isinstance(layer, Upsample) else None
            h = _layer(layer, h, emb, context, opts, shared, hw)
    h = norm_silu_conv(unet.out[0], unet.out[2], h, opts)
    return h.astype(x.dtype)


def _compiles(opts: FastOptions) -> bool:
    """Whether the forward is wrapped in mx.compile: not with the CPU kernels, which evaluate their inputs
    (compiling measured no gain on the CPU anyway)."""
    return opts.compile and not opts.cpu_kernels


class FastUNet:
    """Callable like the UNet: `fast(x, timesteps, context)`; compiled per input shape when opts.compile."""

    def __init__(self, unet, opts: FastOptions | None = None):
        self.unet = unet
        self.opts = opts or default_options("unet")
        self.fused = (FusedProjections(unet, shared=self.opts.shared_projections) if self.opts.fused_qkv
                      else None)
        layout = self.fused.layout if self.fused else None
        # the fused weights are arguments (not captured constants), so new ones reach the compiled graph
        fn = lambda x, t, c, fused: unet_forward(self.unet, x, t, c, self.opts, fused, layout)  # noqa: E731
        self._fn = mx.compile(fn, inputs=unet.state) if _compiles(self.opts) else fn

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array) -> mx.array:
        fused = self.fused.weights() if self.fused else {}
        n = min(self.opts.batch_streams, x.shape[0])
        if n <= 1:
            return self._fn(x, timesteps, context, fused)
        step = -(-x.shape[0] // n)
        outs = []
        for i, stream in zip(range(0, x.shape[0], step), _cpu_streams(n), strict=False):
            with mx.stream(stream):
                outs.append(self._fn(x[i:i + step], timesteps[i:i + step], context[i:i + step], fused))
        return mx.concatenate(outs, axis=0)


# ---------------------------------------------------------------------------------------------- VAE
def _vae_resnet(blk, x: mx.array, opts: FastOptions) -> mx.array:
    h = norm_silu_conv(blk.norm1, blk.conv1, x, opts)
    h = norm_silu_conv(blk.norm2, blk.conv2, h, opts)
    if "nin_shortcut" in blk:
        x = conv2d(blk.nin_shortcut, x, opts, padding=0)
    return x + h


def _vae_attn(blk, x: mx.array, opts: FastOptions) -> mx.array:
    b, h, w, c = x.shape
    y = group_norm(blk.norm, x, opts)
    q, k, v = (conv2d(p, y, opts, padding=0).reshape(b, 1, h * w, c) for p in (blk.q, blk.k, blk.v))
    kernels = _cpu_kernels(opts, x)
    if kernels:  # one head of c channels
        out = kernels.attention(q.reshape(b, h * w, c), k.reshape(b, h * w, c), v.reshape(b, h * w, c), 1,
                                c ** -0.5)
    else:
        out = _attention_core(q, k, v, c ** -0.5, opts)
    return x + conv2d(blk.proj_out, out.reshape(b, h, w, c), opts, padding=0)


def vae_decode_forward(vae, latent: mx.array, opts: FastOptions) -> mx.array:
    """The computation of AutoencoderKL.decode, with the optimised ops; output in the VAE's dtype."""
    dec = vae.decoder
    x = conv2d(vae.post_quant_conv, latent.astype(dec.conv_in.weight.dtype), opts, padding=0)
    x = conv2d(dec.conv_in, x, opts)
    x = _vae_resnet(dec.mid.block_1, x, opts)
    x = _vae_attn(dec.mid.attn_1, x, opts)
    x = _vae_resnet(dec.mid.block_2, x, opts)
    for level in reversed(dec.up):
        for blk in level.block:
            x = _vae_resnet(blk, x, opts)
        if "upsample" in level:
            x = conv2d(level.upsample.conv, _upsample2x(x), opts)
    return norm_silu_conv(dec.norm_out, dec.conv_out, x, opts)


def vae_encode_forward(vae, image: mx.array, opts: FastOptions) -> mx.array:
    """AutoencoderKL.encode's computation (the posterior mode), with the optimised ops; in the VAE's dtype."""
    enc = vae.encoder
    x = conv2d(enc.conv_in, image.astype(enc.conv_in.weight.dtype), opts)
    for level in enc.down:
        for blk in level.block:
            x = _vae_resnet(blk, x, opts)
        if "downsample" in level:  # LDM pads right/bottom only, then a stride-2 conv without padding
            x = conv2d(level.downsample.conv, mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]), opts,
                       stride=2, padding=0)
    x = _vae_resnet(enc.mid.block_1, x, opts)
    x = _vae_attn(enc.mid.attn_1, x, opts)
    x = _vae_resnet(enc.mid.block_2, x, opts)
    x = norm_silu_conv(enc.norm_out, enc.conv_out, x, opts)
    return conv2d(vae.quant_conv, x, opts, padding=0)[..., : vae.config.embed_dim]


class _FastVAEPath:
    """One of the VAE's two directions through sd.accel.fast's ops, compiled per input shape when opts.compile."""

    def __init__(self, vae, forward, opts: FastOptions | None = None):
        self.vae = vae
        self.opts = opts or default_options("vae")
        fn = lambda x: forward(self.vae, x, self.opts)  # noqa: E731
        self._fn = mx.compile(fn, inputs=vae.state) if _compiles(self.opts) else fn

    def __call__(self, x: mx.array) -> mx.array:
        return self._fn(x)


class FastVAEEncoder(_FastVAEPath):
    """Callable like `vae.encode`."""

    def __init__(self, vae, opts: FastOptions | None = None):
        super().__init__(vae, vae_encode_forward, opts)


class FastVAEDecoder(_FastVAEPath):
    """Callable like `vae.decode`."""

    def __init__(self, vae, opts: FastOptions | None = None):
        super().__init__(vae, vae_decode_forward, opts)


def default_options(component: str = "unet") -> FastOptions:
    """The levers that paid, per backend and component (measured by bench/levers.py, see BENCHMARKS.md).

    GPU UNet: im2col 3x3 convs + fused QKV + shared projections (one GEMM for all time-embedding
    projections, one for all cross-attention k|v) under one mx.compile; on MLX's CUDA backend the GroupNorm
    statistics, the (GroupNorm-apply + SiLU +) im2col and attention for 160-wide heads are
    sd/accel/cuda_kernels.py's kernels, elsewhere column-sum GroupNorm and a concatenated im2col. GPU VAE:
    mx.compile + the GroupNorm kernels / column-sum GroupNorm, cuDNN convs (im2col's 9x-wide copies of
    128/256-channel 512x512 activations cost more than they save, and memory). CPU: the C kernels of
    sd/accel/cpu_kernels.py (attention, GEGLU, GroupNorm+SiLU, convs) with fused QKV, uncompiled, where they
    build; else mx.compile + attention's queries split over one CPU stream per core (2 cores: UNet CFG step
    28.4 -> 23.5 s; chunking queries alone did not pay).
    """
    from sd.accel.precision import on_gpu

    if on_gpu():
        kernels = cuda_kernels.available()
        if component == "unet":
            return FastOptions(conv="im2col", groupnorm="colsum", fused_qkv=True, shared_projections=True,
                               cuda_kernels=kernels)
        return FastOptions(groupnorm="colsum", cuda_kernels=kernels)
    import os

    from sd.accel import cpu_kernels

    if cpu_kernels.available():
        return FastOptions(compile=False, cpu_kernels=True, fused_qkv=True)
    return FastOptions(streams=max(1, min(os.cpu_count() or 1, 8)))
