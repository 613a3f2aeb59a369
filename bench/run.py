"""sdgraph benchmark: MLX against diffusers on the same machine, same checkpoint, one run.

    python -m bench --device cpu --quick            # this 2-core CPU, in minutes
    python -m bench --device gpu                    # MLX CUDA vs diffusers eager, channels-last, compile
    python -m bench --sections unet,levers --size tiny --device cpu   # smoke test
    python -m bench --sections upscale --device gpu   # 4x ESRGAN of 512x512, MLX vs spandrel
    python -m bench --sections controlnet --device gpu   # ControlNet + UNet step, MLX vs diffusers

A full-size SD1.5-shaped random checkpoint (fp16, real LDM layout) is generated once under bench/out/
(git-ignored); random weights time the same as real ones. Times are medians of several runs after warm-up.
Prints a markdown table (with ratios best-MLX / diffusers) and writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.common import OUT_DIR, Row, ensure_checkpoint, machine_info
from sd import runtime

ALL_SECTIONS = ("unet", "unet_rr", "vae", "clip", "txt2img", "load", "levers", "upscale", "controlnet",
                "inpaint")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--sections", default="unet,vae,clip,txt2img,load",
                   help=f"comma-separated, of {','.join(ALL_SECTIONS)} (or 'all')")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="checkpoint shapes")
    p.add_argument("--quick", action="store_true", help="fewest repeats; CPU txt2img with 2 steps")
    p.add_argument("--checkpoint", type=Path, help="use this file instead of a generated one")
    p.add_argument("--latent", type=int, default=64, help="UNet latent side (64 = 512x512 images)")
    p.add_argument("--image", type=int, default=512, help="VAE / txt2img image side")
    p.add_argument("--steps", type=int, default=None, help="txt2img steps (20; 2 with --quick on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=0, help="timed runs (default: per device and section)")
    p.add_argument("--unet-dtype", default=None, help="MLX UNet dtype (default: sd/accel/precision.py)")
    p.add_argument("--vae-dtype", default=None, help="MLX VAE dtype (default: sd/accel/precision.py)")
    p.add_argument("--mlx-only", action="store_true", help="skip the diffusers side")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--torch-variants", action="store_true", help="channels-last / compile on CPU too")
    p.add_argument("--load-formats", default="safetensors,ckpt")
    p.add_argument("--levers-set", default="", help="only levers whose names contain one of these")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON/markdown results")
    args = p.parse_args(argv)
    if args.sections == "all":
        args.sections = ",".join(ALL_SECTIONS)
    if args.steps is None:
        args.steps = 2 if (args.quick and args.device == "cpu") else 20
    if args.size == "tiny":
        args.latent, args.image = min(args.latent, 16), min(args.image, 128)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("SDGRAPH_COMPILE", "1")  # measure the compiled graphs even on a fresh GPU
    # OpenBLAS for MLX's CPU backend (before mlx.core is imported), MLX's settings, OMP_WAIT_POLICY=PASSIVE:
    # idle OpenMP threads of torch spin by default; in one process with MLX (and OpenBLAS's threads) on a
    # small CPU they starve the other side: a tiny diffusers UNet went from 40 ms to 4.6 s. Passive waiting.
    runtime.setup()
    try:  # torch first: it must load its own cuDNN before MLX's CUDA build loads another one
        import torch  # noqa: F401
    except ImportError:
        pass
    import mlx.core as mx

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError:
            pass
    from bench import levers, sections

    out_dir = args.out or Path(os.environ.get("OUT") or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.device)
    print("[bench] " + json.dumps(info), flush=True)
    path = args.checkpoint or ensure_checkpoint(OUT_DIR / f"sd15-random-{args.size}.safetensors", args.size)
    ctx = sections.Context(args, path)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if "load" in wanted:  # first: its child processes need the memory the other sections' models hold
        wanted = ["load"] + [s for s in wanted if s != "load"]
    lever_rows: list[tuple[str, float]] = []
    started = time.perf_counter()
    for name in wanted:
        t0 = time.perf_counter()
        if name in sections.SECTIONS:
            sections.SECTIONS[name](ctx)
        elif name == "levers":
            lever_rows += levers.op_profile(ctx)
            lever_rows += levers.unet_levers(ctx)
            lever_rows += levers.vae_levers(ctx)
        elif name == "load":
            section_load(ctx, path)
        else:
            print(f"unknown section {name!r}", file=sys.stderr)
            return 2
        print(f"[bench] section {name} took {time.perf_counter() - t0:.0f} s", flush=True)

    table = sections.ratio_table(ctx.rows)
    text = [f"## {info.get('gpu', info['cpu'])} ({args.device}), {info['date']}", "",
            "versions: " + ", ".join(f"{k} {info[k]}" for k in ("mlx", "torch", "diffusers", "python", "cuda")
                                     if k in info),
            "", table]
    if lever_rows:
        text += ["", "| lever (MLX only) | ms |", "|---|---|"] + [f"| {n} | {v:.2f} |" for n, v in lever_rows]
    if ctx.extra:
        text += ["", "extra: " + json.dumps(ctx.extra)]
    text = "\n".join(text)
    print("\n" + text, flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out_dir / f"bench-{args.device}-{stamp}.md").write_text(text + "\n")
    (out_dir / f"bench-{args.device}-{stamp}.json").write_text(json.dumps(
        {"info": info, "args": {k: str(v) for k, v in vars(args).items()},
         "rows": [r.__dict__ for r in ctx.rows], "levers": lever_rows, "extra": ctx.extra}, indent=1))
    print(f"[bench] done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def section_load(ctx, safetensors_path: Path) -> None:
    from bench.load import measure

    fmts = [f.strip() for f in ctx.args.load_formats.split(",") if f.strip()]
    for fmt in fmts:
        path = safetensors_path if fmt == "safetensors" else ensure_checkpoint(
            safetensors_path.with_suffix(".ckpt"), ctx.args.size)
        impls = ["mlx"] + ([] if ctx.args.mlx_only else ["diffusers"])
        for cold in (True, False):
            secs, rss = {}, {}
            for impl in impls:
                r = measure(impl, path, cold)
                secs[impl], rss[impl] = r["seconds"], r["peak_rss"] / 2**20
                if cold and not r["cache_dropped"]:
                    ctx.extra[f"load_{fmt}_{impl}_cold_cache_not_dropped"] = True
            label = "cold (page cache dropped)" if cold else "warm (file cached)"
            size = path.stat().st_size / 2**30
            ctx.add("load", f"{fmt} {size:.1f} GiB fp16, {label}: time", "s", secs)
            ctx.add("load", f"{fmt} {size:.1f} GiB fp16, {label}: peak RSS of the process (imports included)",
                    "MiB", rss)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["main", "Row"]
