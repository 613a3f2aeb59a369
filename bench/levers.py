"""Each optimisation lever of sd/accel/fast.py measured on its own: UNet CFG step and VAE decode, MLX only.

Every variant runs on the same loaded weights and inputs; the table lists median ms per variant and its
ratio to the plain modules (`sd.models.unet.UNetModel.__call__`, eager). Also the VAE decode in fp32/fp16/bf16
with the largest activation magnitude seen (fp16 overflows past 65504).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from sd.accel.fast import FastOptions, FastUNet, FastVAEDecoder

UNET_VARIANTS = [
    ("default sd.accel.fast (im2col + colsum GN, compiled)", FastOptions(conv="im2col", groupnorm="colsum")),
    ("default without mx.compile", FastOptions(compile=False, conv="im2col", groupnorm="colsum")),
    ("default + fused QKV", FastOptions(conv="im2col", groupnorm="colsum", fused_qkv=True)),
    ("eager, sd.accel.fast ops (no compile)", FastOptions(compile=False)),
    ("mx.compile whole UNet", FastOptions()),
    ("compile + fused QKV", FastOptions(fused_qkv=True)),
    ("compile + attention auto (manual for head dim 160 / cross)", FastOptions(attention="auto")),
    ("compile + attention manual everywhere", FastOptions(attention="manual")),
    ("compile + im2col 3x3 convs", FastOptions(conv="im2col")),
    ("compile + two-stage GroupNorm", FastOptions(groupnorm="two_stage")),
    ("compile + column-sum GroupNorm", FastOptions(groupnorm="colsum")),
    ("combo: im2col + colsum GN", FastOptions(conv="im2col", groupnorm="colsum")),
    ("combo: im2col + colsum GN + fused QKV + auto attention",
     FastOptions(conv="im2col", groupnorm="colsum", fused_qkv=True, attention="auto")),
    ("combo: colsum GN + fused QKV + auto attention",
     FastOptions(groupnorm="colsum", fused_qkv=True, attention="auto")),
]


def unet_levers(ctx) -> list[tuple[str, float]]:
    from bench.sections import unet_inputs

    results = []
    dtypes = ["float16", "bfloat16"] if ctx.gpu else ["float32"]
    for dtype in dtypes:
        unet, cfg = ctx.mlx("unet", dtype)
        x, t, c = unet_inputs(ctx, ctx.args.latent, cfg.context_dim)
        args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(c))
        base = ctx.time_mlx(lambda: unet(*args)) * 1e3  # noqa: B023
        results.append((f"UNet {dtype}: plain modules (eager)", base))
        print(f"[levers] UNet {dtype} plain: {base:.2f} ms", flush=True)
        variants = UNET_VARIANTS if dtype == dtypes[0] else UNET_VARIANTS[:3]
        if ctx.args.levers_set:
            variants = [v for v in UNET_VARIANTS if any(s in v[0] for s in ctx.args.levers_set.split(","))]
        for name, opts in variants:
            fast = FastUNet(unet, opts)
            try:
                ms = ctx.time_mlx(lambda: fast(*args)) * 1e3  # noqa: B023
            except Exception as e:  # a lever that does not run on this backend is reported, not fatal
                print(f"[levers] {name}: failed: {e}", flush=True)
                continue
            results.append((f"UNet {dtype}: {name}", ms))
            print(f"[levers] UNet {dtype} {name}: {ms:.2f} ms ({base / ms:.2f}x)", flush=True)
        ctx._mlx.pop(("unet", dtype), None)
    return results


def vae_levers(ctx) -> list[tuple[str, float]]:
    results = []
    size = ctx.args.image
    rng = np.random.default_rng(1)
    z = mx.array(rng.standard_normal((1, size // 8, size // 8, 4)).astype(np.float32))
    dtypes = ["float32", "float16", "bfloat16"] if ctx.gpu else ["float32"]
    for dtype in dtypes:
        vae, _ = ctx.mlx("vae", dtype)
        plain = ctx.time_mlx(lambda: vae.decode(z), heavy=True) * 1e3  # noqa: B023
        fast = FastVAEDecoder(vae, FastOptions())
        compiled = ctx.time_mlx(lambda: fast(z), heavy=True) * 1e3  # noqa: B023
        colsum = FastVAEDecoder(vae, FastOptions(groupnorm="colsum"))
        results.append((f"VAE decode {dtype}: mx.compile + colsum GroupNorm",
                        ctx.time_mlx(lambda: colsum(z), heavy=True) * 1e3))  # noqa: B023
        out = fast(z).astype(mx.float32)
        finite = bool(mx.all(mx.isfinite(out)).item())
        results.append((f"VAE decode {dtype}: plain modules", plain))
        results.append((f"VAE decode {dtype}: mx.compile (finite output: {finite})", compiled))
        print(f"[levers] VAE {dtype}: plain {plain:.2f} ms, compiled {compiled:.2f} ms, finite={finite}",
              flush=True)
        ctx._mlx.pop(("vae", dtype), None)
    return results


def op_profile(ctx, dtype: str | None = None) -> list[tuple[str, float]]:
    """Where the UNet CFG step's time goes: sd.accel.fast's path uncompiled, each op evaluated on its own.

    Synchronising after every op adds a little latency per op, so the sum exceeds the compiled step time;
    the split between op kinds is what this is for.
    """
    import collections
    import time

    import mlx.nn as nn

    import sd.accel.fast as fast_mod
    from bench.sections import unet_inputs

    unet, cfg = ctx.mlx("unet", dtype or ctx.args.unet_dtype)
    x, t, c = unet_inputs(ctx, ctx.args.latent, cfg.context_dim)
    args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(c))
    totals, counts, depth = collections.defaultdict(float), collections.Counter(), [0]

    def wrap(kind_of, fn):
        def timed(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            mx.eval([v for v in a if isinstance(v, mx.array)])
            depth[0] += 1
            start = time.perf_counter()
            out = fn(*a, **k)
            mx.eval(out)
            depth[0] -= 1
            kind = kind_of(*a)
            totals[kind] += time.perf_counter() - start
            counts[kind] += 1
            return out
        return timed

    saved = (fast_mod.conv2d, fast_mod.group_norm, fast_mod.attention, nn.Linear.__call__)
    opts = fast_mod.default_options("unet").with_(compile=False)
    try:
        fast_mod.conv2d = wrap(lambda conv, *_: f"conv {conv.weight.shape[1]}x{conv.weight.shape[2]}",
                               saved[0])
        fast_mod.group_norm = wrap(lambda *_: "GroupNorm", saved[1])
        fast_mod.attention = wrap(lambda attn, x, context, *_: "attention (proj + SDPA), "
                                  + ("self" if context is None else "cross"), saved[2])
        nn.Linear.__call__ = wrap(lambda *_: "linear (GEGLU / FF / time emb)", saved[3])
        fn = lambda: fast_mod.unet_forward(unet, *args, opts)  # noqa: E731
        mx.eval(fn())
        totals.clear()
        counts.clear()
        start = time.perf_counter()
        mx.eval(fn())
        whole = time.perf_counter() - start
    finally:
        fast_mod.conv2d, fast_mod.group_norm, fast_mod.attention, nn.Linear.__call__ = saved
    ordered = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [(f"op profile: {k} (n={counts[k]})", v * 1e3) for k, v in ordered]
    rest = (whole - sum(totals.values())) * 1e3
    rows.append(("op profile: everything else (activations, adds, concat, ...)", rest))
    rows.append(("op profile: total, op-by-op", whole * 1e3))
    for name, ms in rows:
        print(f"[levers] {name}: {ms:.2f} ms", flush=True)
    return rows
