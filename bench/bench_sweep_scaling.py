"""Throughput of an N-variation txt2img seed sweep on 1 rank vs K ranks (`sdgraph run --distributed`).

    .venv/bin/python bench/bench_sweep_scaling.py --ranks 2                       # CPU, ring, tiny model
    .venv/bin/python bench/bench_sweep_scaling.py --ranks 2 --backend nccl --size full --width 512 \\
        --height 512 --steps 20 --variations 32                                  # 2 GPUs of one host

Both runs go through the same path (`python -m cli run ... --distributed -n R`,
`--no-cache`, fresh output folders), so both pay the launcher, the imports, the ring/NCCL set-up and
one model load per rank. The 1-rank baseline uses the ring backend (a world of one never talks; with
several GPUs the rank is pinned to GPU 0). Reported per run:
  wall   seconds from starting mlx.launch to its exit (what a user waits for),
  sweep  rank 0's seconds from its first variation to the gathered report (excludes process start-up
         and the backend's connection set-up; includes model loading).
Throughput is variations per second; the speed-up is 1-rank time / K-rank time. The images of both
runs are compared byte for byte (by variation id). The last line printed is the one-line result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "txt2img.yaml"


def make_model(work: Path, size: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from sd.synthetic import make_checkpoint

    path = work / f"scaling-{size}.safetensors"
    if not path.exists():
        print(f"writing a random-weight {size} checkpoint to {path} ...", file=sys.stderr)
        make_checkpoint(path, size, seed=0)
    return path


def run_sweep(ranks: int, backend: str, ckpt: Path, args, work: Path) -> dict:
    out = work / f"out-{ranks}-{backend}-{time.time_ns()}"
    seeds = ",".join(str(s) for s in range(1, args.variations + 1))
    cmd = [sys.executable, "-m", "cli", "run", str(WORKFLOW), "--distributed", "-n", str(ranks),
           "--backend", backend, "--json", "--quiet", "--no-cache", "--output-dir", str(out),
           "--set", f"ckpt={ckpt}", "--set", f"width={args.width}", "--set", f"height={args.height}",
           "--set", f"steps={args.steps}", "--set", f"sampler={args.sampler}", "--sweep", f"seed={seeds}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, stdin=subprocess.PIPE)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {ranks}-rank run failed (exit {proc.returncode})")
    manifest = json.loads(proc.stdout)
    images = {v["id"]: (work / v["files"][0]).read_bytes() if v["files"] else b""
              for v in manifest["variations"]}
    return {"ranks": ranks, "backend": backend, "wall_s": round(wall, 3), "sweep_s": manifest["seconds"],
            "wall_vps": round(args.variations / wall, 4),
            "sweep_vps": round(args.variations / manifest["seconds"], 4),
            "per_rank": manifest["distributed"]["per_rank"], "images": images}


def device_name() -> str:
    import mlx.core as mx

    return "cuda" if mx.cuda.is_available() else str(mx.default_device())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="K: ranks of the distributed run (default 2)")
    p.add_argument("--backend", default=None, choices=("ring", "nccl", "mpi"),
                   help="backend of the K-rank run (default: nccl with CUDA, else ring)")
    p.add_argument("--variations", type=int, default=8, help="N: seeds in the sweep (default 8)")
    p.add_argument("--size", default="tiny", choices=("tiny", "full"), help="random checkpoint shapes")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "scaling")
    p.add_argument("--skip-baseline", action="store_true", help="only the K-rank run")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from sd import runtime

    runtime.setup()  # before anything imports mlx: picks the fast CPU BLAS
    from nodes.distributed.launch import default_backend

    backend = args.backend or default_backend()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = make_model(args.work_dir, args.size)
    runs = []
    if not args.skip_baseline:
        runs.append(run_sweep(1, "ring", ckpt, args, args.work_dir))
    runs.append(run_sweep(args.ranks, backend, ckpt, args, args.work_dir))

    result = {"bench": "sweep_scaling", "device": device_name(), "variations": args.variations,
              "size": args.size, "width": args.width, "height": args.height, "steps": args.steps,
              "runs": [{k: v for k, v in r.items() if k != "images"} for r in runs]}
    if len(runs) == 2:
        base, dist = runs
        result["speedup_wall"] = round(base["wall_s"] / dist["wall_s"], 3)
        result["speedup_sweep"] = round(base["sweep_s"] / dist["sweep_s"], 3)
        result["identical_images"] = base["images"] == dist["images"]
    if args.json:
        print(json.dumps(result))
        return 0
    parts = [f"sweep_scaling N={args.variations} {args.size} {args.width}x{args.height} steps={args.steps} "
             f"device={result['device']}"]
    for r in runs:
        parts.append(f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''} ({r['backend']}): "
                     f"{r['wall_s']:.1f} s wall = {r['wall_vps']:.3f} var/s, "
                     f"sweep {r['sweep_s']:.1f} s = {r['sweep_vps']:.3f} var/s")
    if len(runs) == 2:
        parts.append(f"speed-up {result['speedup_wall']:.2f}x wall, {result['speedup_sweep']:.2f}x sweep; "
                     f"identical images: {'yes' if result['identical_images'] else 'NO'}")
    print(" | ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
