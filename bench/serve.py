"""Per-image time of a warm server (issue 19): 512² 20-step txt2img through `sdgraph serve`'s ComfyUI API,
against the same through `sdgraph run --sweep` and a diffusers script, each in one process, side by side.

    python -m bench.serve --device gpu                 # full-size SD1.5 shapes, 512², 20 steps
    python -m bench.serve --device cpu --size tiny --image 128 --steps 4 --images 3

- API: `sdgraph serve` starts with the checkpoint in its models folder; a first prompt warms it (loads,
  compiles); then `--images` prompts, one after another, each with a new seed (so the prompt encodings come
  from the cache, as for a user re-queuing), each timed from `POST /prompt` until the WebSocket's "done"
  message (`executing` with node None: what ComfyUI's clients wait for; `--wait poll` polls `/history` every
  2 ms instead, which costs the server's executing thread time: 0.145 against 0.090 s per image for the
  tiny CPU model here). The server's own execution_start -> execution_success time is reported beside it.
- `sdgraph run --sweep seed=...`: the per-variation time of the engine in one process (no HTTP).
- diffusers: bench/cold_start.py's script doing the same job, per image after its first.
Medians; the JSON under bench/out/ keeps every time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.cold_start import _DIFFUSERS, ROOT, _pythonpath, _timed
from bench.common import OUT_DIR, ensure_checkpoint

# new seeds each run, so a reused --cache-dir (kept for its compiled kernels) holds no result of these images
SEED_BASE = random.SystemRandom().randrange(1 << 40)


def api_prompt(ckpt: str, seed: int, size: int, steps: int) -> dict:
    """ComfyUI's default txt2img graph in API format."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {
            "text": "a photograph of an astronaut riding a horse, detailed, sharp focus", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality, watermark",
                                                          "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_done(url: str, prompt_id: str, timeout: float) -> dict:
    """Poll /history every 2 ms until the prompt's entry is there; return it (raise unless it succeeded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _get(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry:
            status = entry.get("status", {})
            if status.get("status_str") != "success":
                raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(status)[:2000]}")
            return entry
        time.sleep(0.002)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")


def _server_seconds(entry: dict) -> float:
    """execution_start -> execution_success in the server's own history record (ms timestamps)."""
    stamps = {event: data["timestamp"] for event, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def _poll_times(url: str, ckpt: str, size: int, steps: int, images: int) -> tuple[list, list]:
    """Each prompt timed from POST /prompt until /history (polled every 2 ms) has it succeeded."""
    times, server = [], []
    for i in range(images + 1):  # the first one loads the models and builds the graphs
        t0 = time.perf_counter()
        body = {"prompt": api_prompt(ckpt, SEED_BASE + i, size, steps), "client_id": "bench"}
        entry = _wait_done(url, _post(url + "/prompt", body)["prompt_id"], 1800)
        times.append(time.perf_counter() - t0)
        server.append(_server_seconds(entry))
        print(f"[serve] image {i}: {times[-1]:.3f} s", flush=True)
    return times, server


async def _ws_times(url: str, ckpt: str, size: int, steps: int, images: int) -> tuple[list, list]:
    """Each prompt timed from POST /prompt until the WebSocket says it is done (`executing` with node None,
    ComfyUI's "done" signal that its own clients wait for); then its history entry must say success."""
    import aiohttp

    times, server = [], []
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/ws?clientId=bench") as ws:
        for i in range(images + 1):  # the first one loads the models and builds the graphs
            t0 = time.perf_counter()
            body = {"prompt": api_prompt(ckpt, SEED_BASE + i, size, steps), "client_id": "bench"}
            async with session.post(url + "/prompt", json=body) as r:
                prompt_id = (await r.json())["prompt_id"]
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                if (m["type"] == "executing" and m["data"].get("node") is None
                        and m["data"].get("prompt_id") == prompt_id):
                    break
            times.append(time.perf_counter() - t0)
            async with session.get(f"{url}/history/{prompt_id}") as r:
                entry = (await r.json())[prompt_id]
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(entry['status'])[:2000]}")
            server.append(_server_seconds(entry))
            print(f"[serve] image {i}: {times[-1]:.3f} s (server {server[-1]:.3f} s)", flush=True)
    return times, server


def api_times(ckpt: Path, work: Path, steps: int, size: int, images: int, env: dict,
              wait: str = "ws") -> dict:
    models = work / "models" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    (models / ckpt.name).symlink_to(ckpt.resolve())
    port = _free_port()
    log = open(work / "serve.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir",
                             str(work / "models"), "--output-dir", str(work / "serve-out"), "--input-dir",
                             str(work / "input")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text()[-3000:])
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                time.sleep(0.1)
        ready = time.perf_counter() - start
        times, server = (asyncio.run(_ws_times(url, ckpt.name, size, steps, images)) if wait == "ws"
                         else _poll_times(url, ckpt.name, size, steps, images))
        return {"wait": wait, "server_ready_s": round(ready, 3), "first_image_s": round(times[0], 3),
                "image_seconds": times[1:], "median_s": statistics.median(times[1:]),
                "server_seconds": server[1:], "server_median_s": statistics.median(server[1:])}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def run_sweep_times(ckpt: Path, work: Path, steps: int, size: int, images: int, env: dict) -> dict:
    seeds = ",".join(str(SEED_BASE + 1000 + i) for i in range(images + 1))
    cmd = [sys.executable, "-m", "cli", "run", str(ROOT / "workflows" / "txt2img.yaml"), "--models-dir",
           str(work / "models"), "--output-dir", str(work / "run-out"), "--set", f"ckpt={ckpt.name}",
           "--set", f"steps={steps}", "--set", f"width={size}", "--set", f"height={size}",
           "--sweep", f"seed={seeds}", "--json"]
    seconds, proc = _timed(cmd, env, ROOT)
    summary = json.loads(proc.stdout)
    per = [sum(n["seconds"] for n in v["nodes"]) for v in summary["variations"]]
    by_node: dict[str, list[float]] = {}
    for v in summary["variations"][1:]:
        for n in v["nodes"]:
            by_node.setdefault(n["id"], []).append(n["seconds"])
    return {"process_s": round(seconds, 3), "image_seconds": per[1:], "median_s": statistics.median(per[1:]),
            "node_median_s": {k: round(statistics.median(v), 4) for k, v in by_node.items()}}


def diffusers_times(ckpt: Path, work: Path, steps: int, size: int, images: int, device: str) -> dict:
    out = work / "diffusers-out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")
    _, proc = _timed([sys.executable, "-c", _DIFFUSERS, str(ckpt), str(out), str(steps), str(size),
                      "cuda" if device == "gpu" else "cpu", str(images + 1), str(ROOT)], env, ROOT)
    per = json.loads(proc.stdout.strip().splitlines()[-1])["image_seconds"]
    return {"image_seconds": per[1:], "median_s": statistics.median(per[1:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="checkpoint shapes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--image", type=int, default=512)
    p.add_argument("--images", type=int, default=10, help="timed images per side (after one warm-up)")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--cache-dir", type=Path, help="sdgraph's cache folder (e.g. one `sdgraph warmup` "
                   "filled); default: a temporary one")
    p.add_argument("--mlx-only", action="store_true", help="skip the diffusers side")
    p.add_argument("--wait", choices=("ws", "poll"), default="ws",
                   help="how the client learns a prompt is done: the WebSocket's done message (as ComfyUI's "
                   "clients wait) or polling /history every 2 ms")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    ckpt = args.checkpoint or ensure_checkpoint(OUT_DIR / f"sd15-random-{args.size}.safetensors", args.size)
    with tempfile.TemporaryDirectory(prefix="sdgraph-serve-bench-") as tmp:
        work = Path(tmp)
        cache = args.cache_dir or work / "cache"
        # a warm server: its graphs compiled (the warm-up prompt builds them if no warmup did)
        env = dict(os.environ, PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1", SDGRAPH_CACHE_DIR=str(cache),
                   SDGRAPH_COMPILE="1")
        result = {"device": args.device, "size": args.size, "steps": args.steps, "image": args.image,
                  "api": api_times(ckpt, work, args.steps, args.image, args.images, env, args.wait)}
        print(f"[serve] API per image: {result['api']['median_s']:.3f} s (in the server: "
              f"{result['api']['server_median_s']:.3f} s)", flush=True)
        result["sdgraph_run"] = run_sweep_times(ckpt, work, args.steps, args.image, args.images, env)
        print(f"[serve] sdgraph run --sweep per image: {result['sdgraph_run']['median_s']:.3f} s "
              f"{result['sdgraph_run']['node_median_s']}", flush=True)
        if not args.mlx_only:
            result["diffusers"] = diffusers_times(ckpt, work, args.steps, args.image, args.images,
                                                  args.device)
            print(f"[serve] diffusers per image: {result['diffusers']['median_s']:.3f} s", flush=True)
        shutil.rmtree(work / "serve-out", ignore_errors=True)
    api = result["api"]["median_s"]
    rows = ["| per image, 512² 20 steps (median) | seconds | API / this |", "|---|---|---|",
            f"| `sdgraph serve`, through the API | {api:.3f} | 1.00 |"]
    for key, label in (("sdgraph_run", "`sdgraph run --sweep`, one process"),
                       ("diffusers", "diffusers script, one process")):
        if key in result:
            rows.append(f"| {label} | {result[key]['median_s']:.3f} | {api / result[key]['median_s']:.2f} |")
    print("\n".join(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"serve-{args.device}-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
