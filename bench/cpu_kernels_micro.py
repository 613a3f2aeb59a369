"""Each C kernel of sd/accel/cpu_kernels.c against the MLX ops it replaces and torch, at SD1.5's full sizes.

    python -m bench.cpu_kernels_micro [--repeats 5] [--blocks 32,64,128,256]

Medians of `repeats` runs, milliseconds, round-robin per shape in one process (torch with
OMP_WAIT_POLICY=PASSIVE, as bench/run.py sets it, so its idle threads do not spin). Also checks that an MLX
op right after a kernel runs at its usual speed (the kernels' OpenMP threads must not spin either).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sd  # noqa: E402,F401  (before mlx: the fast CPU BLAS)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import interleaved, median_time  # noqa: E402
from sd.accel import cpu_kernels as ck  # noqa: E402
from sd.accel.fast import FastOptions, _attention_core, _heads  # noqa: E402

# (what, batch, tokens, context tokens (None: self-attention), heads, head dim)
ATTENTION = (
    ("UNet self 4096 tok, 8x40", 2, 4096, None, 8, 40),
    ("UNet cross 4096x77, 8x40", 2, 4096, 77, 8, 40),
    ("UNet self 1024 tok, 8x80", 2, 1024, None, 8, 80),
    ("UNet self 256 tok, 8x160", 2, 256, None, 8, 160),
    ("VAE mid 4096 tok, 1x512", 1, 4096, None, 1, 512),
)
GEGLU = (("GEGLU 8192x(2x1280)", 8192, 1280), ("GEGLU 2048x(2x2560)", 2048, 2560))
# (what, input shape B H W Cin, Cout)
CONV = (("conv3x3 2x64x64 320->320", (2, 64, 64, 320), 320),
        ("conv3x3 2x32x32 640->640", (2, 32, 32, 640), 640),
        ("conv3x3 2x16x16 1280->1280", (2, 16, 16, 1280), 1280),
        ("conv3x3 2x8x8 2560->1280", (2, 8, 8, 2560), 1280),
        ("conv3x3 2x64x64 4->320 (conv_in)", (2, 64, 64, 4), 320),
        ("conv3x3 1x256x256 256->256 (VAE)", (1, 256, 256, 256), 256),
        ("conv3x3 1x512x512 128->128 (VAE)", (1, 512, 512, 128), 128),
        ("conv3x3 1x512x512 256->256 (VAE)", (1, 512, 512, 256), 256))
GROUPNORM = (("GN+SiLU 2x64x64x320", (2, 64, 64, 320)), ("GN+SiLU 1x512x512x128 (VAE)", (1, 512, 512, 128)),
             ("GN 2x64x64x320 (no SiLU)", (2, 64, 64, 320)))


def timed(fn, repeats: int) -> float:
    return median_time(fn, lambda _: None, 1, repeats)[0] * 1e3


def round_robin(impls: dict, repeats: int) -> dict:
    return {name: statistics.median(t) * 1e3 for name, t in interleaved(impls, repeats).items()}


def show(what: str, ms: dict) -> None:
    print(f"{what:34s} " + "  ".join(f"{k} {v:8.1f}" for k, v in ms.items()), flush=True)


def bench_attention(repeats: int, blocks: list[str]) -> None:
    rng = np.random.default_rng(0)
    mlx_opts = FastOptions(streams=min(os.cpu_count() or 1, 8))
    for what, b, n, ctx, heads, d in ATTENTION:
        inner = heads * d
        x = mx.array(rng.standard_normal((b, n, 3 * inner)).astype(np.float32))
        q, k, v = mx.split(x, 3, axis=-1)
        if ctx:
            c = mx.array(rng.standard_normal((b, ctx, 2 * inner)).astype(np.float32))
            k, v = mx.split(c, 2, axis=-1)
        mx.eval(q, k, v)
        scale = d ** -0.5
        tq, tk, tv = (torch.from_numpy(np.array(t)).view(b, -1, heads, d).transpose(1, 2).contiguous()
                      for t in (q, k, v))
        impls = {"mlx": lambda: mx.eval(_attention_core(_heads(q, heads), _heads(k, heads),  # noqa: B023
                                                        _heads(v, heads), scale, mlx_opts)),  # noqa: B023
                 "torch": lambda: F.scaled_dot_product_attention(tq, tk, tv)}  # noqa: B023
        for blk in blocks:
            qb, _, kb = blk.partition("x")
            impls[f"C {blk}"] = lambda qb=int(qb), kb=int(kb or 0): ck.attention(  # noqa: B023
                q, k, v, heads, scale, qb, kb)  # noqa: B023
        show(what, round_robin(impls, repeats))


def bench_geglu(repeats: int) -> None:
    rng = np.random.default_rng(1)
    for what, n, f in GEGLU:
        h = mx.array(rng.standard_normal((n, 2 * f)).astype(np.float32))
        mx.eval(h)
        th = torch.from_numpy(np.array(h))

        def plain():
            value, gate = mx.split(h, 2, axis=-1)  # noqa: B023
            mx.eval(value * nn.gelu(gate))

        def torch_geglu():
            value, gate = th.chunk(2, dim=-1)  # noqa: B023
            return value * F.gelu(gate)

        show(what, round_robin({"mlx": plain, "torch": torch_geglu, "C": lambda: ck.geglu(h)},  # noqa: B023
                               repeats))


def bench_group_norm(repeats: int) -> None:
    rng = np.random.default_rng(2)
    for what, shape in GROUPNORM:
        silu = "SiLU" in what
        c = shape[-1]
        x = mx.array(rng.standard_normal(shape).astype(np.float32))
        gn = nn.GroupNorm(32, c, pytorch_compatible=True)
        mx.eval(x, gn.parameters())
        tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
        tw, tb = torch.ones(c), torch.zeros(c)

        def plain():
            y = gn(x)  # noqa: B023
            mx.eval(nn.silu(y) if silu else y)  # noqa: B023

        def torch_gn():
            y = F.group_norm(tx, 32, tw, tb)  # noqa: B023
            return F.silu(y) if silu else y  # noqa: B023

        impls = {"mlx": plain, "torch": torch_gn,
                 "C": lambda: ck.group_norm(x, 32, gn.weight, gn.bias, gn.eps, silu)}  # noqa: B023
        show(what, round_robin(impls, repeats))


def bench_conv(repeats: int) -> None:
    rng = np.random.default_rng(4)
    for what, shape, cout in CONV:
        x = mx.array(rng.standard_normal(shape).astype(np.float32))
        conv = nn.Conv2d(shape[-1], cout, 3, padding=1)
        mx.eval(x, conv.parameters())
        tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
        tw = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2).contiguous()
        tb = torch.from_numpy(np.array(conv.bias))
        impls = {"mlx": lambda: mx.eval(conv(x)),  # noqa: B023
                 "torch": lambda: F.conv2d(tx, tw, tb, padding=1),  # noqa: B023
                 "C": lambda: ck.conv3x3(x, conv.weight, conv.bias)}  # noqa: B023
        ms = round_robin(impls, repeats)
        gflop = 2 * np.prod(shape[:3]) * 9 * shape[3] * cout / 1e9
        show(what, ms | {"C GFLOP/s": gflop / ms["C"] * 1e3})


def check_no_spin(repeats: int) -> None:
    """An MLX op right after a kernel must run at its usual speed (no spinning OpenMP threads)."""
    rng = np.random.default_rng(3)
    a = mx.array(rng.standard_normal((8192, 1280)).astype(np.float32))
    w = mx.array(rng.standard_normal((1280, 1280)).astype(np.float32))
    h = mx.array(rng.standard_normal((256, 2560)).astype(np.float32))
    mx.eval(a, w, h)
    alone = timed(lambda: mx.eval(a @ w), repeats)

    def after_kernel():
        ck.geglu(h)
        start = time.perf_counter()
        mx.eval(a @ w)
        return time.perf_counter() - start

    after = statistics.median(after_kernel() for _ in range(repeats)) * 1e3
    print(f"MLX 8192x1280x1280 matmul: alone {alone:.1f} ms, right after a kernel {after:.1f} ms", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", default=f"{ck.ATTENTION_BLOCK}x{ck.ATTENTION_KEY_BLOCK}",
                   help="attention blocks to try, comma-separated QxK (K 0: all keys at once)")
    p.add_argument("--only", default="", help="attention | geglu | groupnorm | conv | spin (default: all)")
    args = p.parse_args(argv)
    if not ck.available():
        raise SystemExit("CPU kernels unavailable")
    torch.set_num_threads(os.cpu_count() or 1)
    threads = ck._library().sdk_threads()
    print(f"threads: C {threads}, torch {torch.get_num_threads()}; times in ms", flush=True)
    parts = {"attention": lambda: bench_attention(args.repeats, args.blocks.split(",")),
             "geglu": lambda: bench_geglu(args.repeats), "groupnorm": lambda: bench_group_norm(args.repeats),
             "conv": lambda: bench_conv(args.repeats),
             "spin": lambda: check_no_spin(args.repeats)}
    for name, fn in parts.items():
        if not args.only or args.only == name:
            fn()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
