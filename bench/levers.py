"""Each optimisation lever of sd/fast.py measured on its own: UNet CFG step and VAE decode, MLX only.

Every variant runs on the same loaded weights and inputs; the table lists median ms per variant and its
ratio to the plain modules (`sd.unet.UNetModel.__call__`, eager). Also: the VAE decode in fp32/fp16/bf16
with the largest activation magnitude seen (fp16 overflows past 65504).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from sd.fast import FastOptions, FastUNet, FastVAEDecoder

UNET_VARIANTS = [
    ("eager, sd.fast ops (no compile)", FastOptions(compile=False)),
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
        base = ctx.time_mlx(lambda: unet(*args)) * 1e3
        results.append((f"UNet {dtype}: plain modules (eager)", base))
        print(f"[levers] UNet {dtype} plain: {base:.2f} ms", flush=True)
        variants = UNET_VARIANTS if dtype == dtypes[0] else UNET_VARIANTS[1:2] + UNET_VARIANTS[-3:]
        if ctx.args.levers_set:
            variants = [v for v in UNET_VARIANTS if any(s in v[0] for s in ctx.args.levers_set.split(","))]
        for name, opts in variants:
            fast = FastUNet(unet, opts)
            try:
                ms = ctx.time_mlx(lambda: fast(*args)) * 1e3
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
        plain = ctx.time_mlx(lambda: vae.decode(z), heavy=True) * 1e3
        fast = FastVAEDecoder(vae)
        compiled = ctx.time_mlx(lambda: fast(z), heavy=True) * 1e3
        out = fast(z).astype(mx.float32)
        finite = bool(mx.all(mx.isfinite(out)).item())
        results.append((f"VAE decode {dtype}: plain modules", plain))
        results.append((f"VAE decode {dtype}: mx.compile (finite output: {finite})", compiled))
        print(f"[levers] VAE {dtype}: plain {plain:.2f} ms, compiled {compiled:.2f} ms, finite={finite}",
              flush=True)
        ctx._mlx.pop(("vae", dtype), None)
    return results
