# isort: skip_file
"""GPU probe: checks sd/accel/cuda_kernels.py against MLX ops, times UNet/VAE variants of
sd.accel's FastOps, and profiles which CUDA kernels one UNet step spends its time in (through torch.profiler's
CUPTI tracing, which records every kernel of the process, MLX's included).

    python3 -m bench.gpu_probe [--out DIR] [--steps 10] [--no-profile] [--torch]

Writes gpu-probe.json (+ the printed log) under --out ($OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch  # noqa: F401  (before MLX: its CUDA wheel's cuDNN must not be loaded first)

from sd import runtime  # noqa: E402

runtime.setup()  # sdgraph's MLX settings (and CPU BLAS), before mlx is imported

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import OUT_DIR, ensure_checkpoint, interleaved, median_time, mlx_unet_loop  # noqa: E402
from bench.gpu_anatomy import split_times  # noqa: E402
from sd.accel import cuda_kernels as K  # noqa: E402
from sd.loading.checkpoint import load_component  # noqa: E402
from sd.accel.compiled import FastUNet, FastVAE  # noqa: E402
from sd.accel.ops import FastOps, FastOptions, options_here  # noqa: E402

RESULTS: dict = {}
LOOP_STEPS = 20


def log(*a):
    print(*a, flush=True)


def median_ms(fn, repeats=10) -> float:
    return median_time(fn, lambda _: None, 3, repeats)[0] * 1e3


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


# --------------------------------------------------------------------------------------- checks
def check_kernels():
    try:
        _check_kernels()
    except Exception as e:  # a kernel that does not compile must not cost the timings
        log(f"[check] FAILED {type(e).__name__}: {e}")


def channel_sums(x: mx.array) -> tuple[mx.array, mx.array]:
    """The GroupNorm kernel's partial sums of x and x^2 [B, C], finished with an MLX sum (checked below)."""
    b, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, c)
    sums = K._partial_sums(x3, K._chunk_for(b, x3.shape[1])).sum(axis=1)
    return sums[:, 0], sums[:, 1]


def _check_kernels():
    import mlx.nn as nn

    rng = np.random.default_rng(0)
    out = {}
    for dt in (mx.float16, mx.bfloat16, mx.float32):
        for shape, groups in (((2, 64, 64, 320), 32), ((1, 96, 80, 128), 32), ((2, 8, 8, 1280), 32)):
            x = mx.array((rng.standard_normal(shape) * 3 + 1).astype(np.float32)).astype(dt)
            s1, s2 = channel_sums(x)
            xf = x.astype(mx.float32).reshape(shape[0], -1, shape[-1])
            e1 = rel(s1, xf.sum(axis=1))
            e2 = rel(s2, mx.square(xf).sum(axis=1))
            gn = nn.GroupNorm(groups, shape[-1], pytorch_compatible=True)
            gn.weight = mx.array(rng.standard_normal(shape[-1]).astype(np.float32)).astype(dt)
            gn.bias = mx.array(rng.standard_normal(shape[-1]).astype(np.float32)).astype(dt)
            e_gn = rel(FastOps(FastOptions(cuda_kernels=True)).group_norm(gn, x), gn(x.astype(mx.float32)))
            conv = nn.Conv2d(shape[-1], 64, 3, padding=1)
            conv.weight = conv.weight.astype(dt)
            conv.bias = conv.bias.astype(dt)
            ref = conv(nn.silu(gn(x)))
            scale, shift = K.group_norm_affine(gn, x)
            e_conv = rel(K.conv3x3(conv, x, scale, shift, silu=True), ref)
            e_plain = rel(K.conv3x3(conv, x), conv(x))
            e = mx.array(rng.standard_normal((shape[0], shape[-1])).astype(np.float32) * 4).astype(dt)
            sc, sh = K.group_norm_affine(gn, x, mx.contiguous(e.T))
            e_off = rel(x.astype(mx.float32) * sc[:, None, None, :] + sh[:, None, None, :],
                        gn((x + e[:, None, None, :]).astype(mx.float32)))
            key = f"{str(dt).split('.')[-1]} {shape}"
            out[key] = {"sum": e1, "sumsq": e2, "gn": e_gn, "gn_silu_conv": e_conv, "conv": e_plain,
                        "gn_offset": e_off}
            log(f"[check] {key}: " + ", ".join(f"{k}={v:.2e}" for k, v in out[key].items()))
    RESULTS["checks"] = out


# ----------------------------------------------------------------------------------------- UNet
def unet_variants(unet, args):
    """Each lever's UNet step, timed in turn (interleaved rounds: the host's speed drifts), with its output's
    difference from the first variant's."""
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((2, 64, 64, 4)).astype(np.float32))
    t = mx.array(np.array([500.0, 500.0], np.float32))
    c = mx.array(rng.standard_normal((2, 77, 768)).astype(np.float32))
    base = options_here("unet").with_(cuda_kernels=True, shared_projections=False)
    variants = {
        "kernels": base,
        "kernels, no attention kernel": base,
        "kernels+shared": base.with_(shared_projections=True),
        "no kernels": base.with_(cuda_kernels=False),
        "kernels, no mx.compile": base.with_(compile=False),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    outs, fns = {}, {}
    for name, opts in variants.items():
        try:
            fast = FastUNet(unet, opts)
            supported = K.attention_supported
            if "no attention kernel" in name:  # compiled on this first call: trace it without the kernel
                K.attention_supported = lambda *a: False
            try:
                outs[name] = fast(x, t, c)
                mx.eval(outs[name])
            finally:
                K.attention_supported = supported
            fns[name] = lambda f=fast: mx.eval(f(x, t, c))
            ref = next(iter(outs.values()))
            log(f"[unet] {name}: rel diff vs first {rel(outs[name], ref):.2e}")
        except Exception as e:  # keep going: one failing lever must not cost the run
            log(f"[unet] {name}: FAILED {type(e).__name__}: {e}")
    _, times = timed_in_turn(fns, args.rounds, args.steps)
    log("[unet] step medians (ms): " + ", ".join(f"{k}={v:.2f}" for k, v in times.items()))
    RESULTS["unet_ms"] = times
    if args.variants:
        return x, t, c
    # CPU-side cost of building and dispatching one step (GPU work overlaps it)
    split = split_times(FastUNet(unet, options_here("unet")), x, t, c)
    RESULTS["unet_dispatch_ms"] = split["call_ms"] + split["dispatch_ms"]
    log(f"[unet] dispatch (graph build + async_eval) {RESULTS['unet_dispatch_ms']:.2f} ms")
    return x, t, c


def profile_kernels(fn, label: str, steps: int = 5):
    from torch.profiler import ProfilerActivity, profile

    fn()
    mx.synchronize() if hasattr(mx, "synchronize") else None
    s = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
    wall = (time.perf_counter() - s) / steps * 1e3
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    spans = []
    for e in kernels:
        dur = e.time_range.elapsed_us()
        by_name.setdefault(e.name, []).append(dur)
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in spans:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        busy += cur_e - cur_s
    total = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]
    log(f"[profile {label}] wall {wall:.2f} ms/step, kernels {len(kernels) / steps:.0f}/step, "
        f"kernel time {total / steps / 1e3:.2f} ms/step, GPU busy {busy / steps / 1e3:.2f} ms/step")
    rows = []
    for name, durs in top:
        rows.append({"name": name[:160], "count": len(durs) / steps, "ms_per_step": sum(durs) / steps / 1e3})
        log(f"   {sum(durs) / steps / 1e3:7.3f} ms  x{len(durs) / steps:5.0f}  {name[:150]}")
    RESULTS.setdefault("profiles", {})[label] = {
        "wall_ms": wall, "kernels_per_step": len(kernels) / steps, "kernel_ms": total / steps / 1e3,
        "busy_ms": busy / steps / 1e3, "top": rows}


# ------------------------------------------------------------------------------------------ VAE
def vae_variants(vae, args):
    rng = np.random.default_rng(2)
    z = mx.array(rng.standard_normal((1, 64, 64, 4)).astype(np.float32))
    base = options_here("vae")
    variants = {"default": base, "default+cuda_kernels": base.with_(cuda_kernels=True),
                "cuda_kernels + im2col (fused GN-SiLU-im2col)": base.with_(cuda_kernels=True, conv="im2col")}
    times, outs = {}, {}
    for name, opts in variants.items():
        try:
            dec = FastVAE(vae, opts).decode
            outs[name] = dec(z)
            mx.eval(outs[name])
            times[name] = median_ms(lambda d=dec: mx.eval(d(z)), repeats=args.steps)
            diff = rel(outs[name], outs["default"])
            log(f"[vae] {name}: {times[name]:.2f} ms (rel diff vs default {diff:.2e})")
        except Exception as e:
            log(f"[vae] {name}: FAILED {type(e).__name__}: {e}")
    RESULTS["vae_ms"] = times
    return z


def torch_unet(path, args):
    from tests.reference import diffusers_unet, read_state
    from sd.loading.checkpoint import load_checkpoint

    ck = load_checkpoint(path, parts=("unet",))
    state = read_state(path)
    model = diffusers_unet(ck.unet_config, state).to("cuda", torch.float16)
    model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((2, 4, 64, 64)).astype(np.float32)).cuda().half()
    t = torch.tensor([500.0, 500.0]).cuda()
    c = torch.from_numpy(rng.standard_normal((2, 77, 768)).astype(np.float32)).cuda().half()

    def run(m):
        with torch.inference_mode():
            m(x, t, encoder_hidden_states=c)
        torch.cuda.synchronize()

    RESULTS["torch_eager_cl_ms"] = median_ms(lambda: run(model))
    log(f"[torch] diffusers eager channels-last: {RESULTS['torch_eager_cl_ms']:.2f} ms")
    if args.torch_compile:
        cm = torch.compile(model)
        s = time.perf_counter()
        run(cm)
        log(f"[torch] compile took {time.perf_counter() - s:.0f} s")
        RESULTS["torch_compile_ms"] = median_ms(lambda: run(cm))
        log(f"[torch] diffusers torch.compile: {RESULTS['torch_compile_ms']:.2f} ms")


def env_sweep(args):
    import re
    import subprocess
    import sys

    sweep = {}
    for setting in ["(defaults)"] + args.env_sweep.split(";"):
        env = dict(os.environ)
        if setting != "(defaults)":
            env.update(kv.split("=", 1) for kv in setting.split(","))
        cmd = [sys.executable, "-m", "bench.gpu_probe", "--skip", "checks,vae", "--no-profile",
               "--variants", "kernels", "--out", "/tmp/sweep", "--steps", str(args.steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        m = re.search(r"step medians \(ms\): kernels=([0-9.]+)", proc.stdout)
        sweep[setting] = float(m.group(1)) if m else None
        log(f"[env] {setting}: {sweep[setting]} ms" + ("" if m else f"  (failed: {proc.stderr[-500:]})"))
    RESULTS["env_sweep_ms"] = sweep


def timed_in_turn(impls: dict, rounds: int, steps: int) -> tuple[dict, dict]:
    """bench.common.interleaved with 3 warm-ups and a log line per round: per-call ms lists, their medians."""
    def progress(r, times):
        log(f"[rr] round {r + 1}: " + ", ".join(f"{k}={statistics.median(v[-steps:]) * 1e3:.2f}"
                                               for k, v in times.items()))

    times = interleaved(impls, rounds, per_round=steps, warmup=3, on_round=progress)
    times = {k: [t * 1e3 for t in v] for k, v in times.items()}
    return times, {k: statistics.median(v) for k, v in times.items()}


def round_robin(path, args):
    """MLX fast (today's defaults) vs diffusers eager channels-last vs torch.compile, fp16, the same inputs,
    interleaved: each round times `--steps` CFG steps of each, so a host whose speed drifts (the MLX side is
    bound by its CPU-side dispatch) weighs on all alike. Then the VAE decode the same way."""
    from tests.reference import diffusers_unet, diffusers_vae, read_state
    from sd.loading.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    state = read_state(path)
    rng = np.random.default_rng(1)
    xn = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
    cn = rng.standard_normal((2, 77, 768)).astype(np.float32)
    x, t, c = mx.array(xn.transpose(0, 2, 3, 1)), mx.array(np.array([500.0, 500.0], np.float32)), mx.array(cn)
    fast = FastUNet(ck.unet)
    # what a first run on a fresh GPU uses (sd/accel/gpu_cache.py): the same ops, no mx.compile
    eager = FastUNet(ck.unet, options_here("unet").with_(compile=False))
    tx = torch.from_numpy(xn).cuda().half().contiguous(memory_format=torch.channels_last)
    tt, tc = torch.tensor([500.0, 500.0]).cuda(), torch.from_numpy(cn).cuda().half()
    model = diffusers_unet(ck.unet_config, state).to("cuda", torch.float16)
    model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model)

    def torch_step(m):
        def run():
            with torch.inference_mode():
                out = m(tx, tt, encoder_hidden_states=tc).sample
            torch.cuda.synchronize()
            return out
        return run

    impls = {"mlx_fast": lambda: mx.eval(fast(x, t, c)), "mlx_uncompiled": lambda: mx.eval(eager(x, t, c)),
             "diffusers_cl": torch_step(model), "diffusers_compile": torch_step(compiled)}
    s = time.perf_counter()
    ref = impls["diffusers_compile"]()
    log(f"[rr] torch.compile took {time.perf_counter() - s:.0f} s")
    mine = fast(x, t, c)
    diff = rel(mine, mx.array(ref.float().cpu().numpy().transpose(0, 2, 3, 1)))
    log(f"[rr] MLX fast vs diffusers (compiled) output: max rel diff {diff:.2e}")
    times, med = timed_in_turn(impls, args.rounds, args.steps)
    log("[rr] UNet CFG step medians (ms): " + ", ".join(f"{k}={v:.2f}" for k, v in med.items())
        + f"; MLX/eager-cl {med['mlx_fast'] / med['diffusers_cl']:.2f}, "
        f"MLX/compile {med['mlx_fast'] / med['diffusers_compile']:.2f}")
    RESULTS["rr_unet_ms"] = {"median": med, "all": times, "mlx_vs_diffusers_rel_diff": diff}

    # the same UNet inside a 20-step loop (each step feeds the next, as a sampler does): MLX pipelined by
    # sd.sampling.ksampler.StepPipeline (step i computes while step i+1's graph is built), torch launching
    # asynchronously and synchronising once at the end; ms per step
    def mlx_loop():
        mlx_unet_loop(fast, x, t, c, LOOP_STEPS)

    def torch_loop(m):
        def run():
            with torch.inference_mode():
                xx = tx
                for _ in range(LOOP_STEPS):
                    xx = xx - 1e-3 * m(xx, tt, encoder_hidden_states=tc).sample
            torch.cuda.synchronize()
        return run

    loops = {"mlx_fast": mlx_loop, "mlx_uncompiled": lambda: mlx_unet_loop(eager, x, t, c, LOOP_STEPS),
             "diffusers_cl": torch_loop(model),
             "diffusers_compile": torch_loop(compiled)}
    times, med = timed_in_turn(loops, args.rounds, 2)
    med = {k: v / LOOP_STEPS for k, v in med.items()}
    log(f"[rr] UNet step inside a {LOOP_STEPS}-step loop (ms per step): "
        + ", ".join(f"{k}={v:.2f}" for k, v in med.items())
        + f"; MLX/eager-cl {med['mlx_fast'] / med['diffusers_cl']:.2f}, "
        f"MLX/compile {med['mlx_fast'] / med['diffusers_compile']:.2f}")
    RESULTS["rr_unet_loop_ms_per_step"] = {"median": med, "all_loops_ms": times}
    del model, compiled

    # VAE decode 512x512: MLX (bf16, defaults) vs diffusers fp16 / fp32 eager
    zn = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    z = mx.array(zn.transpose(0, 2, 3, 1))
    dec = FastVAE(ck.vae).decode
    dec_eager = FastVAE(ck.vae, options_here("vae").with_(compile=False)).decode
    vae16 = diffusers_vae(ck.vae_config, state).to("cuda", torch.float16)
    vae32 = diffusers_vae(ck.vae_config, state).to("cuda", torch.float32)
    tz16, tz32 = torch.from_numpy(zn).cuda().half(), torch.from_numpy(zn).cuda()

    def torch_dec(m, z_):
        def run():
            with torch.inference_mode():
                m.decode(z_)
            torch.cuda.synchronize()
        return run

    impls = {"mlx_fast": lambda: mx.eval(dec(z)), "mlx_uncompiled": lambda: mx.eval(dec_eager(z)),
             "diffusers_fp16": torch_dec(vae16, tz16),
             "diffusers_fp32": torch_dec(vae32, tz32)}
    times, med = timed_in_turn(impls, args.rounds, args.steps)
    log("[rr] VAE decode 512x512 medians (ms): " + ", ".join(f"{k}={v:.2f}" for k, v in med.items()))
    RESULTS["rr_vae_ms"] = {"median": med, "all": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(OUT_DIR))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--torch", action="store_true", help="also time diffusers eager (channels-last)")
    p.add_argument("--torch-compile", action="store_true", help="and torch.compile (~60-90 s to compile)")
    p.add_argument("--skip", default="", help="comma list of: checks,unet,vae")
    p.add_argument("--rr", action="store_true", help="round-robin MLX vs diffusers, UNet and VAE")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="", help="comma list of UNet variant names to run (default: all)")
    p.add_argument("--env-sweep", default="", help="';'-separated VAR=value[,VAR=value] settings: reruns the "
                   "cuda_kernels UNet variant in a subprocess under each (MLX reads these once, at start)")
    args = p.parse_args(argv)
    os.environ.setdefault("SDGRAPH_COMPILE", "1")  # measure the compiled graphs even on a fresh GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    log(f"[probe] mlx {mx.__version__}, device {mx.default_device()}, kernels available: {K.available()}")
    path = ensure_checkpoint(OUT_DIR / "sd15-random-full.safetensors", "full")
    try:
        if "checks" not in skip:
            check_kernels()
        if "unet" not in skip:
            unet = load_component(path, "unet", dtype="float16")
            x, t, c = unet_variants(unet, args)
            if not args.no_profile:
                for name, opts in (("kernels", options_here("unet").with_(shared_projections=False)),
                                   ("kernels+shared", options_here("unet"))):
                    f = FastUNet(unet, opts)
                    profile_kernels(lambda f=f: mx.eval(f(x, t, c)), name)
            del unet
        if "vae" not in skip:
            vae = load_component(path, "vae")
            vae_variants(vae, args)
            del vae
        if args.env_sweep:
            env_sweep(args)
        if args.rr:
            round_robin(path, args)
        if args.torch or args.torch_compile:
            torch_unet(path, args)
    finally:
        (out / "gpu-probe.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
