# isort: skip_file
"""Where one MLX UNet step's time and memory go on the GPU: host (CPU-side) cost per kernel type, the ordered
kernel sequence of one step (CUPTI, through torch.profiler), graph-build vs dispatch time, and working memory.

    python3 -m bench.gpu_anatomy [--out DIR] [--skip host,split,loop,memory,trace]

Writes gpu-anatomy.json (and trace.json, the step's kernels in launch order) under --out ($OUT when set).
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

from bench.common import OUT_DIR, ensure_checkpoint, mlx_unet_loop  # noqa: E402
from bench.sections import mlx_working_memory  # noqa: E402
from sd.loading.checkpoint import load_component  # noqa: E402
from sd.accel.compiled import FastUNet  # noqa: E402
from sd.accel.ops import options_here  # noqa: E402

RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------- host cost per op type
_COPY_SRC = """
    size_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < x_shape[0] * x_shape[1]) out[i] = x[i];
"""


def host_costs(n: int = 300, repeats: int = 7) -> dict:
    """Wall time per op of a chain of n tiny ops of one type, evaluated eagerly: the GPU work is negligible,
    so this is MLX's host cost of building, dispatching (CUDA graph node) and completing one such kernel."""
    f16 = mx.float16
    a = mx.random.normal((64, 64)).astype(f16)
    w, b = mx.ones((64,), f16), mx.zeros((64,), f16)
    copy = None
    if mx.cuda.is_available():
        copy = mx.fast.cuda_kernel(name="anatomy_copy", input_names=["x"], output_names=["out"],
                                   source=_COPY_SRC)
    mx.eval(a, w, b)
    ops = {
        "add (binary)": lambda x: x + a,
        "fused elementwise (compiled x*a+b)": mx.compile(lambda x: x * a + b),
        "matmul 64x64": lambda x: x @ a,
        "addmm, bias vector": lambda x: mx.addmm(b, x, a),
        "addmm, full C": lambda x: mx.addmm(a, x, a),
        "layer_norm": lambda x: mx.fast.layer_norm(x, w, b, 1e-5),
        "custom kernel (copy)": lambda x: copy(inputs=[x], grid=(x.size, 1, 1), threadgroup=(256, 1, 1),
                                               output_shapes=[x.shape], output_dtypes=[x.dtype])[0],
        "sdpa (cuDNN, D=64)": lambda x: mx.fast.scaled_dot_product_attention(
            *(x.reshape(1, 1, 64, 64),) * 3, scale=0.1).reshape(64, 64),
        "transpose copy": lambda x: mx.contiguous(x.T) if hasattr(mx, "contiguous") else (x.T + 0),
        "softmax": lambda x: mx.softmax(x, axis=-1),
        "sum over axis 0": lambda x: x - x.sum(axis=0, keepdims=True),
    }
    out = {}
    for name, op in ops.items():
        try:
            def chain(op=op):
                y = a
                for _ in range(n):
                    y = op(y)
                return y
            mx.eval(chain())
            build, total = [], []
            for _ in range(repeats):
                s = time.perf_counter()
                y = chain()
                m = time.perf_counter()
                mx.eval(y)
                e = time.perf_counter()
                build.append(m - s)
                total.append(e - s)
            out[name] = {"build_us": statistics.median(build) / n * 1e6,
                         "total_us": statistics.median(total) / n * 1e6}
            log(f"[host] {name}: {out[name]['total_us']:.1f} us/op (graph build {out[name]['build_us']:.1f})")
        except Exception as e:
            log(f"[host] {name}: FAILED {type(e).__name__}: {e}")
    return out


# ----------------------------------------------------------------------------------- step anatomy
def unet_inputs():
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((2, 64, 64, 4)).astype(np.float32))
    t = mx.array(np.array([500.0, 500.0], np.float32))
    c = mx.array(rng.standard_normal((2, 77, 768)).astype(np.float32))
    return x, t, c


def split_times(fast, x, t, c, repeats: int = 15) -> dict:
    """Per step: Python + compiled-graph replay (the call), async_eval's return (dispatch of every kernel),
    and the wait for the GPU afterwards."""
    mx.eval(fast(x, t, c))
    call, dispatch, wait = [], [], []
    for _ in range(repeats):
        mx.synchronize()
        s = time.perf_counter()
        y = fast(x, t, c)
        m = time.perf_counter()
        mx.async_eval(y)
        d = time.perf_counter()
        mx.eval(y)
        e = time.perf_counter()
        call.append(m - s)
        dispatch.append(d - m)
        wait.append(e - d)
    res = {k: statistics.median(v) * 1e3 for k, v in (("call_ms", call), ("dispatch_ms", dispatch),
                                                      ("wait_ms", wait))}
    log("[split] " + ", ".join(f"{k}={v:.2f}" for k, v in res.items()))
    return res


def loop_ms(fast, x, t, c, steps: int = 20, repeats: int = 5) -> float:
    """ms per step of a 20-step loop, each step fed the previous one's output and pipelined the way the
    samplers are (sd.sampling.ksampler.StepPipeline: step i evaluates while step i+1's graph is built)."""
    def run():
        mlx_unet_loop(fast, x, t, c, steps)

    run()
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        run()
        times.append(time.perf_counter() - s)
    res = statistics.median(times) / steps * 1e3
    log(f"[loop] {res:.2f} ms per step ({steps}-step loop, median of {repeats})")
    return res


def trace(fn, out: Path, steps: int = 3) -> dict:
    """The kernels of one step in launch order (name, start offset us, duration us), and a count per name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            mx.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(ev) // steps
    last = ev[-per:]
    t0 = last[0].time_range.start
    seq = [[e.name[:200], e.time_range.start - t0, e.time_range.elapsed_us()] for e in last]
    (out / "trace.json").write_text(json.dumps(seq))
    span = (last[-1].time_range.end - t0) / 1e3
    busy = sum(e.time_range.elapsed_us() for e in last) / 1e3
    log(f"[trace] {per} kernels/step, span {span:.2f} ms, kernel time {busy:.2f} ms -> {out / 'trace.json'}")
    return {"kernels": per, "span_ms": span, "kernel_ms": busy}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(OUT_DIR))
    p.add_argument("--skip", default="")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "SDGRAPH_"))}
    log(f"[anatomy] mlx {mx.__version__}, env {env}")
    RESULTS["env"] = env
    try:
        if "host" not in skip:
            RESULTS["host_us_per_op"] = host_costs()
        path = ensure_checkpoint(OUT_DIR / "sd15-random-full.safetensors", "full")
        unet = load_component(path, "unet", dtype="float16")
        x, t, c = unet_inputs()
        fast = FastUNet(unet, options_here("unet"))
        if "split" not in skip:
            RESULTS["split"] = split_times(fast, x, t, c)
        if "loop" not in skip:
            RESULTS["loop_ms_per_step"] = loop_ms(fast, x, t, c)
        if "memory" not in skip:
            RESULTS["unet_working_mib"] = mlx_working_memory(lambda: fast(x, t, c))
            log(f"[memory] UNet step working memory {RESULTS['unet_working_mib']:.0f} MiB, "
                f"weights {mx.get_active_memory() / 2**20:.0f} MiB active")
        if "trace" not in skip:
            RESULTS["trace"] = trace(lambda: mx.eval(fast(x, t, c)), out)

    finally:
        (out / "gpu-anatomy.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
