"""Hand-written CUDA kernels for the ops MLX's CUDA backend runs slowly in the SD UNet and VAE.

MLX compiles (`mx.compile`) chains of element-wise ops into one kernel, but a GroupNorm's statistics are
reductions it runs separately over an fp32 copy, and a 3x3 convolution done as im2col + GEMM (faster than
MLX's cuDNN convs on the H100, docs/performance.md) costs a pad copy plus nine slice copies; and attention
with heads wider than 128 (SD's 1280-channel levels: 8 heads of 160) has no fused kernel in MLX, whose
fallback is ~7 kernels with head-transposing copies. These kernels replace them:

- GroupNorm (`group_norm_affine`): per-(batch, channel) sums of x and x^2 over pixel chunks, read once in the
  input dtype, in fp32 (no atomics; deterministic), then one block per (group, batch) finishing them into a
  per-channel scale/shift, with a ResBlock's time-embedding offset folded into the statistics.
- `im2col3x3`: the [pixels, 9*C] im2col matrix of a zero-padded 3x3 window, written in one pass; optionally
  applying a per-(batch, channel) affine map and SiLU to the input first, so GroupNorm-apply + SiLU + im2col
  is one kernel feeding one GEMM.
- `attention`: softmax(q k^T) v for 129..256-wide heads, flash attention's online softmax in fp32.

Compiled once per machine, not per process: each kernel variant is compiled with NVRTC (sd/accel/nvrtc.py)
to a cubin for this GPU's architecture, kept in sdgraph's kernel folder (sd/accel/binary_cache.py: verified
before use), and run with `mx.fast.precompiled_cuda_kernel`. (MLX's `mx.fast.cuda_kernel` JIT-compiles in
every new process: ~1-3 s per variant, ~40 s for a 512² txt2img.) Shapes are kernel arguments, so a variant is
one (kernel, dtypes, flags) combination: a handful per model, the same at every image size and batch.

Used by `sd/accel/ops.py` only where `available()` (MLX's CUDA backend, NVRTC found); everything else keeps
the MLX ops. `SDGRAPH_CUDA_KERNELS=0` switches them off.
"""

from __future__ import annotations

import hashlib
import sys
from functools import cache

import mlx.core as mx

from sd import runtime
from sd.accel import binary_cache
from sd.runtime import switches

_THREADS = 256
_CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}
_PRELUDE = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
"""

_compiled_here: list[str] = []  # variants this process compiled (not found in the kernel folder)


def disabled() -> bool:
    return not switches.flag("SDGRAPH_CUDA_KERNELS")


@cache
def _toolchain() -> tuple[str, str, str] | str:
    """(GPU architecture, driver version, NVRTC version), or why the kernels cannot be built here."""
    from sd.accel import nvrtc

    try:
        arch, driver = nvrtc.gpu_architecture()
        return arch, driver, nvrtc.version()
    except (nvrtc.NvrtcError, OSError) as e:
        return str(e)


def available() -> bool:
    """MLX computes on its CUDA backend by default, NVRTC is there, and the kernels are not switched off."""
    return (not disabled() and bool(mx.cuda.is_available()) and mx.default_device().type == mx.DeviceType.gpu
            and isinstance(_toolchain(), tuple))


def describe() -> str:
    """One line for `sdgraph doctor`."""
    if disabled():
        return "off (SDGRAPH_CUDA_KERNELS=0)"
    if not mx.cuda.is_available():
        return "not used (MLX is not on its CUDA backend)"
    tools = _toolchain()
    if not isinstance(tools, tuple):
        return f"not used ({tools}); MLX's own ops instead"
    arch, _, version = tools
    return (f"on (GroupNorm statistics, im2col 3x3 convs, 160-wide attention; NVRTC {version} cubins for "
            f"{arch}, kept in {runtime.kernel_cache_dir()})")


def cuda_type(dtype: mx.Dtype) -> str:
    if dtype not in _CUDA_TYPES:
        raise TypeError(f"no CUDA kernel for dtype {dtype}")
    return _CUDA_TYPES[dtype]


def kernel_source(name: str, params: str, constants: dict, body: str) -> str:
    """A self-contained translation unit: `extern "C" __global__ void name(params)`, the variant's
    compile-time constants (types as `using`, numbers as constexpr), then the body."""
    lines = []
    for key, value in constants.items():
        if isinstance(value, mx.Dtype):
            lines.append(f"using {key} = {cuda_type(value)};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {key} = {'true' if value else 'false'};")
        else:
            lines.append(f"constexpr int {key} = {int(value)};")
    # types must be known in the parameter list: declare them at file scope, numbers inside the function
    types = "\n".join(line for line in lines if line.startswith("using"))
    numbers = "\n    ".join(line for line in lines if not line.startswith("using"))
    return (f"{_PRELUDE}{types}\n\nextern \"C\" __global__ void {name}({params}) {{\n    {numbers}\n"
            f"{body}\n}}\n")


def variant_name(kernel: str, constants: dict) -> str:
    """The name of one compiled variant: unique per (kernel, constants) (MLX keys loaded modules by name)."""
    text = kernel + "|" + "|".join(f"{k}={v}" for k, v in constants.items())
    return f"{kernel}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@cache
def _binary(kernel: str, params: str, body: str, constants_items: tuple) -> tuple[str, bytes]:
    """(function name, cubin) of one variant: from the kernel folder, else compiled now and stored there."""
    from sd.accel import nvrtc

    constants = dict(constants_items)
    name = variant_name(kernel, constants)
    source = kernel_source(name, params, constants, body)
    arch, _driver, version = _toolchain()
    key = hashlib.sha256(f"{arch}|nvrtc {version}|{source}".encode()).hexdigest()[:20]
    target = runtime.kernel_cache_dir() / f"cuda-{name}-{arch}-{key}.cubin"
    data = binary_cache.read(target)
    if data is None:
        _announce()
        data = nvrtc.compile_cubin(source, arch, name=f"{name}.cu")
        _compiled_here.append(name)
        try:
            binary_cache.store(target, data)
        except (OSError, RuntimeError) as e:  # an unwritable cache: compile again next time, say so once
            print(f"sdgraph: cannot keep compiled GPU kernels in {target.parent} ({e})", file=sys.stderr)
    return name, data


def _announce() -> None:
    from sd.accel import gpu_cache

    gpu_cache.announce(str(runtime.kernel_cache_dir()))


def compiled_here() -> list[str]:
    """The variants this process had to compile (for `sdgraph warmup` and the tests)."""
    return list(_compiled_here)


def _launch(kernel: str, params: str, body: str, constants: dict, inputs: list, scalars: list, grid,
            threadgroup, output_shapes, output_dtypes) -> list[mx.array]:
    name, cubin = _binary(kernel, params, body, tuple(constants.items()))
    return mx.fast.precompiled_cuda_kernel(
        name=name, compiled_source=cubin, inputs=inputs, scalars=scalars, grid=grid, threadgroup=threadgroup,
        output_shapes=output_shapes, output_dtypes=output_dtypes, ensure_row_contiguous=True)


# ------------------------------------------------------------------------------------ channel sums
_SUMS_PARAMS = "const T* x, float* part, int P, int C, int CHUNK"
_SUMS_BODY = """
    const int nchunk = gridDim.x;
    const int chunk = blockIdx.x;
    const int b = blockIdx.y;
    const int p0 = chunk * CHUNK;
    const int p1 = min(P, p0 + CHUNK);
    const T* xb = x + (size_t)b * P * C;
    for (int c = threadIdx.x * 2; c < C; c += blockDim.x * 2) {
        float s1a = 0.f, s2a = 0.f, s1b = 0.f, s2b = 0.f;
        for (int p = p0; p < p1; ++p) {
            const float va = static_cast<float>(xb[(size_t)p * C + c]);
            const float vb = static_cast<float>(xb[(size_t)p * C + c + 1]);
            s1a += va; s2a += va * va; s1b += vb; s2b += vb * vb;
        }
        float* o = part + ((size_t)(b * nchunk + chunk) * 2) * C;
        o[c] = s1a; o[c + 1] = s1b;
        o[C + c] = s2a; o[C + c + 1] = s2b;
    }
"""


def _chunk_for(batch: int, pixels: int) -> int:
    """Pixels per block: enough blocks (~2 per SM on an H100) without tiny chunks."""
    want_blocks = 264
    chunk = max(16, -(-pixels * batch // want_blocks))
    return min(chunk, pixels)


def _partial_sums(x3: mx.array, chunk: int) -> mx.array:
    """x3 [B, P, C] -> [B, nchunk, 2, C] float32 partial sums of x and x^2 over chunks of `chunk` pixels."""
    b, pixels, c = x3.shape
    nchunk = -(-pixels // chunk)
    (part,) = _launch("sdgraph_channel_sums", _SUMS_PARAMS, _SUMS_BODY, {"T": x3.dtype}, [x3],
                      [pixels, c, chunk], grid=(nchunk * _THREADS, b, 1), threadgroup=(_THREADS, 1, 1),
                      output_shapes=[(b, nchunk, 2, c)], output_dtypes=[mx.float32])
    return part


_AFFINE_PARAMS = ("const float* part, const WT* weight, const BT* bias, const OT* offset, float* scale, "
                  "float* shift, int B, int nchunk, int C, int G, int NPIX, int CHUNK, int eps_e9")
_AFFINE_BODY = """
    // one block per (group, batch): finish the partial sums, then scale/shift for the group's channels.
    // With OFFSET, the statistics are those of x + offset (a per-(batch, channel) shift folded in, never
    // added; stored channel-major, offset[c * B + b]):
    // a chunk of n pixels has sum(x+e) = S1 + n e and sum((x+e)^2) = S2 + 2 e S1 + n e^2.
    const int g = blockIdx.x;
    const int b = blockIdx.y;
    const int cpg = C / G;
    const float* pb = part + (size_t)b * nchunk * 2 * C;
    float s1 = 0.f, s2 = 0.f;
    for (int i = threadIdx.x; i < nchunk * cpg; i += blockDim.x) {
        const int k = i / cpg;
        const int c = g * cpg + i % cpg;
        const float p1 = pb[(size_t)k * 2 * C + c];
        const float p2 = pb[(size_t)k * 2 * C + C + c];
        if (OFFSET) {
            const float e = static_cast<float>(offset[(size_t)c * B + b]);
            const float n = (float)min(CHUNK, NPIX - k * CHUNK);
            s1 += p1 + n * e;
            s2 += p2 + 2.f * e * p1 + n * e * e;
        } else {
            s1 += p1;
            s2 += p2;
        }
    }
    __shared__ float sh1[32];
    __shared__ float sh2[32];
    for (int o = 16; o > 0; o /= 2) {
        s1 += __shfl_down_sync(0xffffffff, s1, o);
        s2 += __shfl_down_sync(0xffffffff, s2, o);
    }
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    if (lane == 0) { sh1[warp] = s1; sh2[warp] = s2; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x / 32;
        s1 = lane < nw ? sh1[lane] : 0.f;
        s2 = lane < nw ? sh2[lane] : 0.f;
        for (int o = 16; o > 0; o /= 2) {
            s1 += __shfl_down_sync(0xffffffff, s1, o);
            s2 += __shfl_down_sync(0xffffffff, s2, o);
        }
        if (lane == 0) { sh1[0] = s1; sh2[0] = s2; }
    }
    __syncthreads();
    const float n = (float)NPIX * cpg;
    const float mean = sh1[0] / n;
    const float var = fmaxf(sh2[0] / n - mean * mean, 0.f);
    const float rstd = rsqrtf(var + eps_e9 * 1e-9f);  // eps as an int: MLX 0.32.4 refuses float scalars
    for (int j = threadIdx.x; j < cpg; j += blockDim.x) {
        const int c = g * cpg + j;
        const float sc = rstd * static_cast<float>(weight[c]);
        const float e = OFFSET ? static_cast<float>(offset[(size_t)c * B + b]) : 0.f;
        scale[(size_t)b * C + c] = sc;
        shift[(size_t)b * C + c] = static_cast<float>(bias[c]) + (e - mean) * sc;
    }
"""


def group_norm_affine(gn, x: mx.array, offset_t: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """(scale, shift) [B, C] float32 with group_norm(x) == x*scale + shift (FastOps applies them, fused by
    mx.compile into the next element-wise kernel or into the im2col kernel): two kernels (partial sums over
    pixel chunks, then one block per (group, batch) finishing them). With `offset_t` [C, B] (an offset
    [B, C], transposed), the same for x + offset (broadcast over pixels), never summed:
    x*scale + shift == group_norm(x + offset_t.T)."""
    b, c, g = x.shape[0], x.shape[-1], gn.num_groups
    x3 = x.reshape(b, -1, c)
    chunk = _chunk_for(b, x3.shape[1])
    part = _partial_sums(x3, chunk)
    weight = gn.weight if "weight" in gn else mx.ones((c,), mx.float32)
    bias = gn.bias if "bias" in gn else mx.zeros((c,), mx.float32)
    offset = offset_t if offset_t is not None else mx.zeros((1,), mx.float32)
    constants = {"WT": weight.dtype, "BT": bias.dtype, "OT": offset.dtype, "OFFSET": offset_t is not None}
    scale, shift = _launch(
        "sdgraph_gn_affine", _AFFINE_PARAMS, _AFFINE_BODY, constants, [part, weight, bias, offset],
        [b, part.shape[1], c, g, x3.shape[1], chunk, round(gn.eps * 1e9)],
        grid=(g * 128, b, 1), threadgroup=(128, 1, 1),
        output_shapes=[(b, c), (b, c)], output_dtypes=[mx.float32, mx.float32])
    return scale, shift


def supported(x: mx.array) -> bool:
    """The kernels' layout needs: an even channel count, 16-byte rows for the vector loads."""
    return x.shape[-1] % 2 == 0 and (x.shape[-1] * x.dtype.size) % 16 == 0


# ------------------------------------------------------------------------------------------ im2col
_IM2COL_PARAMS = "const T* x, const float* scale, const float* shift, T* out, int B, int H, int W, int C"
_IM2COL_BODY = """
    const int CV = C / VEC;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t total = (size_t)B * H * W * 9 * CV;
    if (idx >= total) return;
    const int cv = idx % CV;
    size_t r = idx / CV;
    const int tap = r % 9;
    const size_t pix = r / 9;
    const int xw = pix % W;
    r = pix / W;
    const int yh = r % H;
    const int b = r / H;
    const int yi = yh + tap / 3 - 1;
    const int xi = xw + tap % 3 - 1;
    alignas(16) T vals[VEC];
    if (yi < 0 || yi >= H || xi < 0 || xi >= W) {
        #pragma unroll
        for (int e = 0; e < VEC; ++e) vals[e] = static_cast<T>(0.f);
    } else {
        const T* src = x + (((size_t)b * H + yi) * W + xi) * C + cv * VEC;
        *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(src);
        if (AFFINE) {
            const float* sc = scale + (size_t)b * C + cv * VEC;
            const float* sh = shift + (size_t)b * C + cv * VEC;
            #pragma unroll
            for (int e = 0; e < VEC; ++e) {
                float v = static_cast<float>(vals[e]) * sc[e] + sh[e];
                if (SILU) v = v / (1.f + expf(-v));
                vals[e] = static_cast<T>(v);
            }
        }
    }
    T* dst = out + pix * 9 * C + (size_t)tap * C + cv * VEC;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
"""


def im2col3x3(x: mx.array, scale: mx.array | None = None, shift: mx.array | None = None,
              silu: bool = False) -> mx.array:
    """x [B, H, W, C] -> [B*H*W, 9*C], tap-major (ky, kx) then channel, zero padding 1 — the layout of an MLX
    conv weight [O, 3, 3, C] reshaped to [O, 9*C]. With scale/shift [B, C] float32, each input value v becomes
    v*scale + shift (then SiLU if `silu`) before it is placed; the padding stays zero."""
    b, h, w, c = x.shape
    vec = 16 // x.dtype.size
    affine = scale is not None
    if not affine:
        scale = shift = mx.zeros((1,), mx.float32)
    constants = {"T": x.dtype, "VEC": vec, "AFFINE": affine, "SILU": bool(silu)}
    (out,) = _launch("sdgraph_im2col3x3", _IM2COL_PARAMS, _IM2COL_BODY, constants, [x, scale, shift],
                     [b, h, w, c], grid=(b * h * w * 9 * (c // vec), 1, 1), threadgroup=(_THREADS, 1, 1),
                     output_shapes=[(b * h * w, 9 * c)], output_dtypes=[x.dtype])
    return out


# ------------------------------------------------------------------------------------- attention
_ATTN_PARAMS = "const T* q, const T* k, const T* v, const float* scale, T* out, int H, int Lq, int Lk"
_ATTN_BODY = """
    // One block: QB queries of one (batch, head). K/V pass through shared memory in tiles of KB keys;
    // softmax by flash attention's online recurrence, all in fp32 on CUDA cores (heads this kernel serves
    // are short: SD's 160-wide heads see 64-256 queries and keys). q/k/v are row-contiguous [B, L, H*D].
    constexpr int QB = 32, KB = 16, NT = 256, DPT = D / 8;
    __shared__ float qs[QB][D + 1];
    __shared__ float ks[KB][D + 1];
    __shared__ float vs[KB][D];
    __shared__ float S[QB][KB + 1];
    __shared__ float m_s[QB], l_s[QB], a_s[QB];
    const size_t row = (size_t)H * D;
    const int b = blockIdx.y / H;
    const int h = blockIdx.y % H;
    const int q0 = blockIdx.x * QB;
    const int t = threadIdx.x;
    const float sc = scale[0];
    const T* qb = q + (size_t)b * Lq * row + h * D;
    const T* kb = k + (size_t)b * Lk * row + h * D;
    const T* vb = v + (size_t)b * Lk * row + h * D;
    for (int i = t; i < QB * D; i += NT) {
        const int r = i / D, d = i % D;
        qs[r][d] = q0 + r < Lq ? static_cast<float>(qb[(size_t)(q0 + r) * row + d]) * sc : 0.f;
    }
    if (t < QB) { m_s[t] = -INFINITY; l_s[t] = 0.f; }
    const int ro = t >> 3;        // this thread's output row and its dims (t & 7) + 8 j
    float acc[DPT];
    #pragma unroll
    for (int j = 0; j < DPT; ++j) acc[j] = 0.f;
    for (int k0 = 0; k0 < Lk; k0 += KB) {
        __syncthreads();
        for (int i = t; i < KB * D; i += NT) {
            const int c = i / D, d = i % D;
            const bool in = k0 + c < Lk;
            ks[c][d] = in ? static_cast<float>(kb[(size_t)(k0 + c) * row + d]) : 0.f;
            vs[c][d] = in ? static_cast<float>(vb[(size_t)(k0 + c) * row + d]) : 0.f;
        }
        __syncthreads();
        #pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
            const int c = (t & 7) + 8 * cc;
            float s = 0.f;
            #pragma unroll 8
            for (int d = 0; d < D; ++d) s += qs[ro][d] * ks[c][d];
            S[ro][c] = k0 + c < Lk ? s : -INFINITY;
        }
        __syncthreads();
        {
            const int w = t >> 5, lane = t & 31;
            for (int rr = 0; rr < QB / 8; ++rr) {
                const int r = w * (QB / 8) + rr;
                const float s = lane < KB ? S[r][lane] : -INFINITY;
                float mx = s;
                for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
                const float m_old = m_s[r];
                const float m_new = fmaxf(m_old, mx);
                const float p = s == -INFINITY ? 0.f : __expf(s - m_new);
                float sum = p;
                for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
                if (lane < KB) S[r][lane] = p;
                if (lane == 0) {
                    const float a = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
                    a_s[r] = a;
                    l_s[r] = l_s[r] * a + sum;
                    m_s[r] = m_new;
                }
            }
        }
        __syncthreads();
        const float a = a_s[ro];
        #pragma unroll
        for (int j = 0; j < DPT; ++j) acc[j] *= a;
        for (int c = 0; c < KB; ++c) {
            const float p = S[ro][c];
            #pragma unroll
            for (int j = 0; j < DPT; ++j) acc[j] += p * vs[c][(t & 7) + 8 * j];
        }
    }
    const int qi = q0 + ro;
    if (qi < Lq) {
        const float inv = 1.f / l_s[ro];
        T* o = out + ((size_t)b * Lq + qi) * row + h * D;
        #pragma unroll
        for (int j = 0; j < DPT; ++j) o[(t & 7) + 8 * j] = static_cast<T>(acc[j] * inv);
    }
"""


def attention_supported(q: mx.array, k: mx.array, heads: int) -> bool:
    """Heads cuDNN's fused attention does not take (wider than 128) and this kernel does: a multiple of 8 up
    to 256 wide."""
    d = q.shape[-1] // heads
    return 128 < d <= 256 and d % 8 == 0 and q.ndim == 3 and k.ndim == 3


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float) -> mx.array:
    """softmax(scale q k^T) v per head, q [B, Lq, heads*D], k/v [B, Lk, heads*D] -> [B, Lq, heads*D]. Views
    (thirds of a fused projection) are made row-contiguous first: at the levels this kernel serves (64-256
    tokens) that copy is small."""
    b, lq, inner = q.shape
    d = inner // heads
    (out,) = _launch("sdgraph_attention", _ATTN_PARAMS, _ATTN_BODY, {"T": q.dtype, "D": d},
                     [q, k, v, mx.array([scale], mx.float32)], [heads, lq, k.shape[1]],
                     grid=(-(-lq // 32) * 256, b * heads, 1), threadgroup=(256, 1, 1),
                     output_shapes=[(b, lq, inner)], output_dtypes=[q.dtype])
    return out


# ------------------------------------------------------------------------------------ composites
def conv3x3(conv, x: mx.array, scale: mx.array | None = None, shift: mx.array | None = None,
            silu: bool = False) -> mx.array:
    """A stride-1, padding-1 3x3 conv: one im2col kernel (with the optional fused affine + SiLU), one GEMM."""
    b, h, w, _ = x.shape
    wt = conv.weight
    cols = im2col3x3(x, scale, shift, silu)
    out = mx.addmm(conv.bias, cols, wt.reshape(wt.shape[0], -1).T)
    return out.reshape(b, h, w, -1)

