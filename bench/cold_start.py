"""Cold start: what a user waits for, from process start to PNG, in fresh processes (issue 14).

    python -m bench.cold_start --device gpu                  # full-size SD1.5 shapes, 512², 20 steps
    python -m bench.cold_start --device cpu --size tiny      # the CPU parts, in a minute

Side by side, in one run on one machine:
- sdgraph (`sdgraph run workflows/txt2img.yaml`): (a) the first run with every cache empty (a new cache
  folder: sdgraph's kernels, MLX's kernel cache, the node cache), (b) a later process with a new seed (kernels
  compiled, the prompt encodings cached), (b') the same with `--no-cache`, (c) the second image of one
  process (`--sweep seed=...`, the time of its second variation);
- a diffusers script doing the same job (load the same checkpoint file, encode, 20 Euler steps with CFG,
  decode, write the PNG): (a) a first process, (b) a later one, (c) its second image in one process.
The checkpoint is the random-weight one of `python -m bench` (bench/out/, real LDM layout). Prints a markdown
table and writes JSON under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT_DIR, ensure_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A diffusers process doing what `sdgraph run workflows/txt2img.yaml` does (weights from the same file).
_DIFFUSERS = r"""
import sys, time, json
start = time.perf_counter()
ckpt, out, device = sys.argv[1], sys.argv[2], sys.argv[5]
steps, size, images = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
import numpy as np, torch
from PIL import Image
sys.path.insert(0, sys.argv[7])
from tests import reference
from sd.text.tokenizer import default_tokenizer
from diffusers import EulerDiscreteScheduler
dtype = torch.float16 if device == "cuda" else torch.float32
from sd.models.clip import clip_config_from_weights
from sd.models.unet import unet_config_from_weights
from sd.models.vae import vae_config_from_weights
state = reference.read_state(ckpt)
def shapes(prefix):
    return {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
unet_cfg = unet_config_from_weights(shapes("model.diffusion_model."))
vae_cfg = vae_config_from_weights(shapes("first_stage_model."))
clip_cfg = clip_config_from_weights(shapes("cond_stage_model.transformer."))
def part(prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}
unet = reference.diffusers_unet(unet_cfg, part("model.diffusion_model.")).to(device, dtype).eval()
vae = reference.diffusers_vae(vae_cfg, part("first_stage_model.")).to(device, dtype).eval()
clip = reference.transformers_clip(clip_cfg, part("cond_stage_model.transformer.")).to(device, dtype).eval()
tok = default_tokenizer()
ids = [([49406] + tok.encode(p)[:75] + [49407] * 77)[:77] for p in ("blurry, low quality, watermark",
       "a photograph of an astronaut riding a horse, detailed, sharp focus")]
sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               timestep_spacing="linspace", steps_offset=1)
times = []
with torch.inference_mode():
    for i in range(images):
        t0 = time.perf_counter()
        cond = clip(torch.tensor(ids, device=device)).last_hidden_state
        sched.set_timesteps(steps, device=device)
        gen = torch.Generator("cpu").manual_seed(42 + i)
        lat = torch.randn((1, 4, size // 8, size // 8), generator=gen).to(device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t).to(dtype)
            eps = unet(inp, t, encoder_hidden_states=cond).sample
            un, co = eps.float().chunk(2)
            lat = sched.step(un + 7.5 * (co - un), t, lat).prev_sample
        img = vae.decode((lat / 0.18215).to(dtype)).sample
        arr = ((img[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).round().byte().cpu().numpy()
        Image.fromarray(arr).save(f"{out}/diffusers_{i:05}.png")
        times.append(time.perf_counter() - t0)
print(json.dumps({"image_seconds": times, "in_process": time.perf_counter() - start}))
"""


def _pythonpath() -> str:
    """The repo first, then whatever the caller had on PYTHONPATH (e.g. a staged MLX build)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def _timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc


def as_installed(work: Path, mlx_only: bool) -> None:
    """Give the timed processes the bytecode a `pip install` leaves. Where Python may not write it
    (PYTHONDONTWRITEBYTECODE, as on the lent GPU machine), every process compiles every module it imports
    from source: ~1 s of each later sdgraph process there (networkx alone 0.7 s). A throwaway bytecode folder
    is filled before anything is timed, for both sides."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "bytecode")
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"/(\.venv|\.git|bench/out)/", str(ROOT)],
                   env=env, capture_output=True)
    imports = "import cli; cli.load_node_modules(); import PIL.PngImagePlugin"
    if not mlx_only:
        imports += "; import torch, diffusers, transformers"
    subprocess.run([sys.executable, "-c", imports], env=env, cwd=ROOT, capture_output=True)
    print(f"[cold-start] PYTHONDONTWRITEBYTECODE was set: bytecode compiled ahead into {work / 'bytecode'}, "
          "as an installed package has it", flush=True)


def _kernel_files(cache: Path) -> dict:
    kernels = cache / "kernels"
    return {"mlx_ptx_modules": len(list(kernels.rglob("*.ptx"))),
            "sdgraph_cubins": len(list(kernels.rglob("*.cubin"))),
            "compiled_graph_markers": len(list(kernels.rglob("sdgraph-compiled/*")))}


def sdgraph_cases(ckpt: Path, work: Path, steps: int, size: int, cache: Path | None = None,
                  warmup: bool = True) -> dict:
    cache = cache or work / "sdgraph-cache"
    models = work / "models"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = models / "checkpoints" / ckpt.name
    if not link.exists():
        link.symlink_to(ckpt.resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_PTX_CACHE_DIR", "SDGRAPH_COMPILE")}
    env.update(SDGRAPH_CACHE_DIR=str(cache), PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "cli", "run", str(ROOT / "workflows" / "txt2img.yaml"), "--models-dir",
            str(models), "--set", f"ckpt={ckpt.name}", "--set", f"steps={steps}", "--set", f"width={size}",
            "--set", f"height={size}", "--json"]
    rows = {}

    def run(label, *extra, out="out"):
        seconds, proc = _timed([*base, "--output-dir", str(work / out), *extra], env, ROOT)
        summary = json.loads(proc.stdout)
        notices = [line for line in proc.stderr.splitlines() if line.startswith("sdgraph: ")]
        rows[label] = {"seconds": round(seconds, 3), "files": summary["files"],
                       "nodes": {n["id"]: n["seconds"] for v in summary["variations"] for n in v["nodes"]},
                       "notices": notices, **_kernel_files(cache)}
        print(f"[cold-start] sdgraph {label}: {seconds:.2f} s {rows[label]['nodes']} "
              f"{_kernel_files(cache)} {notices}", flush=True)
        return summary

    def second_image(label, summary):
        per = [sum(n["seconds"] for n in v["nodes"]) for v in summary["variations"]]
        rows[label] = {"seconds": round(per[-1], 3)}

    shutil.rmtree(cache, ignore_errors=True)
    run("first run, empty caches", "--set", "seed=1")
    run("later process, new seed", "--set", "seed=2")
    run("later process, new seed, --no-cache", "--set", "seed=3", "--no-cache")
    second_image("second image in one process", run("one process, 2 images", "--sweep", "seed=4,5"))
    if not warmup:
        return rows
    # `sdgraph warmup` builds the compiled graphs (minutes of NVRTC on a fresh GPU); later runs use them
    seconds, _ = _timed([sys.executable, "-m", "cli", "warmup", "--ckpt", ckpt.name, "--models-dir",
                         str(models), "--size", f"{size}x{size}"], env, ROOT)
    rows["sdgraph warmup"] = {"seconds": round(seconds, 3), **_kernel_files(cache)}
    print(f"[cold-start] sdgraph warmup: {seconds:.2f} s {_kernel_files(cache)}", flush=True)
    run("after warmup: later process, new seed", "--set", "seed=6")
    run("after warmup: later process, new seed, --no-cache", "--set", "seed=7", "--no-cache")
    second_image("after warmup: second image in one process",
                 run("after warmup: one process, 2 images", "--sweep", "seed=8,9"))
    return rows


def diffusers_cases(ckpt: Path, work: Path, steps: int, size: int, device: str) -> dict:
    env = dict(os.environ, PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")
    out = work / "diffusers-out"
    out.mkdir(exist_ok=True)
    rows = {}
    for label, images in (("first process", 1), ("later process", 1), ("one process, 2 images", 2)):
        seconds, proc = _timed([sys.executable, "-c", _DIFFUSERS, str(ckpt), str(out), str(steps), str(size),
                                "cuda" if device == "gpu" else "cpu", str(images), str(ROOT)], env, ROOT)
        rows[label] = {"seconds": round(seconds, 3), **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(f"[cold-start] diffusers {label}: {seconds:.2f} s", flush=True)
    second = rows["one process, 2 images"]["image_seconds"][-1]
    rows["second image in one process"] = {"seconds": round(second, 3)}
    return rows


def table(result: dict) -> str:
    s, d = result["sdgraph"], result.get("diffusers", {})
    lines = ["| situation (process start → PNG) | sdgraph | diffusers | sdgraph / diffusers |",
             "|---|---|---|---|"]
    pairs = [("first run, empty caches", "first process"), ("later process, new seed", "later process"),
             ("later process, new seed, --no-cache", "later process"),
             ("second image in one process", "second image in one process"),
             ("sdgraph warmup", None),
             ("after warmup: later process, new seed", "later process"),
             ("after warmup: later process, new seed, --no-cache", "later process"),
             ("after warmup: second image in one process", "second image in one process")]
    for mine, theirs in pairs:
        a = s.get(mine, {}).get("seconds")
        b = d.get(theirs, {}).get("seconds") if theirs else None
        if a is None:
            continue
        ratio = f"{a / b:.2f}" if a and b else "–"
        lines.append(f"| {mine} | {a:.2f} s | {f'{b:.2f} s' if b else '–'} | {ratio} |")
    # what a new process costs beyond the image itself: a later process against the second image of one
    later, second = "later process, new seed", "second image in one process"
    if later in s and second in s:
        mine = s[later]["seconds"] - s[second]["seconds"]
        their_later, their_second = (dict(pairs)[k] for k in (later, second))
        theirs = (d[their_later]["seconds"] - d[their_second]["seconds"]
                  if their_later in d and their_second in d else None)
        lines.append(f"| a new process's overhead (later process − second image) | {mine:.2f} s | "
                     + (f"{theirs:.2f} s | {mine / theirs:.2f} |" if theirs else "– | – |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="checkpoint shapes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--image", type=int, default=512)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--mlx-only", action="store_true", help="skip the diffusers side")
    p.add_argument("--no-warmup", action="store_true", help="skip `sdgraph warmup` and the runs after it")
    p.add_argument("--cache-dir", type=Path, help="sdgraph's cache folder (emptied first, kept after: later "
                   "benchmarks can reuse its compiled kernels); default: a temporary one")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    ckpt = args.checkpoint or ensure_checkpoint(OUT_DIR / f"sd15-random-{args.size}.safetensors", args.size)
    with tempfile.TemporaryDirectory(prefix="sdgraph-cold-") as tmp:
        work = Path(tmp)
        as_installed(work, args.mlx_only)
        result = {"device": args.device, "size": args.size, "steps": args.steps, "image": args.image,
                  "sdgraph": sdgraph_cases(ckpt, work, args.steps, args.image, args.cache_dir,
                                           not args.no_warmup)}
        if not args.mlx_only:
            result["diffusers"] = diffusers_cases(ckpt, work, args.steps, args.image, args.device)
    text = table(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"cold-start-{args.device}-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
