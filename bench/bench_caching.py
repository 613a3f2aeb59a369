"""Caching between runs (issue 6): wall time of a first run vs an identical re-run vs a prompt-only change
vs a seed-only change of `workflows/txt2img.yaml`, through the real CLI.

    .venv/bin/python bench/bench_caching.py                           # tiny checkpoint, 64x64, 4 steps
    .venv/bin/python bench/bench_caching.py --size full --width 256 --height 256 --steps 4

Series (each with its own fresh --cache-dir and --output-dir in a temporary folder):
  subprocess  one `python -m cli run ... --json` process per scenario: the cross-process numbers, where
              everything reused comes from the disk cache (and the converted-weights cache, which lets
              the checkpoint load by memory-map). Includes interpreter start-up and imports; the
              `startup` row (`sdgraph nodes`, which imports everything and runs nothing) is that floor.
  in-process  `cli.main([...])` called in this process once per scenario (imports already done, not
              timed). Each `sdgraph run` builds its own in-memory cache, so what a re-run reuses here also
              comes from disk; the difference to the subprocess series is process start-up and imports.
  sweep       one `cli.main(["run", ..., "--sweep", "seed=S1,S2", "--sweep", "prompt=@file"])`: the
              in-memory tier, shared by a sweep's variations. Variations in order: first, prompt-only
              change, seed-only change (vs the first), both (each encoding already seen). Seconds there
              are the sum of the variation's node seconds (the JSON summary has no per-variation wall time).
The checkpoint is random weights in the real SD1.5 layout (`bench/out/sd15-random-{size}.safetensors`,
git-ignored, written once and shared with `bench/run.py`); the file itself is usually in the OS page
cache. Counts come from the `--json` summary: nodes that ran / came from the memory cache / from the disk
cache / were not needed (of the 7 nodes in txt2img). The last line printed is the one-line summary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import OUT_DIR, ensure_checkpoint  # noqa: E402

WORKFLOW = ROOT / "workflows" / "txt2img.yaml"
PROMPT_A = "a photograph of an astronaut riding a horse, detailed, sharp focus"
PROMPT_B = "a lighthouse on a cliff at dawn, detailed, sharp focus"
SEED_A, SEED_B = 42, 7
SCENARIOS = (  # (name, prompt, seed): each run after the first reuses the caches of the runs before it
    ("first run", PROMPT_A, SEED_A),
    ("identical re-run", PROMPT_A, SEED_A),
    ("prompt-only change", PROMPT_B, SEED_A),
    ("seed-only change", PROMPT_B, SEED_B),
)
STATUSES = {"ran": "ran", "memory cache": "memory", "disk cache": "disk", "not needed": "not_needed"}
COUNTS = tuple(STATUSES.values())


def run_args(ckpt: Path, args, cache: Path, out: Path, prompt: str | None, seed: int | None) -> list[str]:
    argv = ["run", str(WORKFLOW), "--json", "--cache-dir", str(cache), "--output-dir", str(out),
            "--set", f"ckpt={ckpt}", "--set", f"width={args.width}", "--set", f"height={args.height}",
            "--set", f"steps={args.steps}"]
    if prompt is not None:
        argv += ["--set", f"prompt={prompt}"]
    if seed is not None:
        argv += ["--set", f"seed={seed}"]
    return argv


def counts(variation: dict) -> dict[str, int]:
    out = dict.fromkeys(STATUSES.values(), 0)
    for node in variation["nodes"]:
        key = STATUSES.get(node["status"])
        if key:
            out[key] += 1
    return out


def row(series: str, scenario: str, seconds: float, variation: dict | None) -> dict:
    c = counts(variation) if variation else dict.fromkeys(COUNTS)
    slowest = max(variation["nodes"], key=lambda n: n["seconds"]) if variation else None
    return {"series": series, "scenario": scenario, "seconds": round(seconds, 3), **c,
            "slowest": f"{slowest['id']} {slowest['seconds']:.2f}" if slowest else None,
            "node_seconds": {n["id"]: n["seconds"] for n in variation["nodes"]} if variation else None}


def subprocess_series(ckpt: Path, args, work: Path) -> list[dict]:
    cache, out = work / "cache", work / "output"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def launch(argv: list[str]) -> tuple[float, str]:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cli", *argv], cwd=work, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"`sdgraph {' '.join(argv[:2])}` failed (exit {proc.returncode})")
        return seconds, proc.stdout

    rows = [row("subprocess", "startup (sdgraph nodes)", launch(["nodes"])[0], None)]
    for name, prompt, seed in SCENARIOS:
        seconds, stdout = launch(run_args(ckpt, args, cache, out, prompt, seed))
        rows.append(row("subprocess", name, seconds, json.loads(stdout)["variations"][0]))
        progress(rows[-1])
    return rows


def call_cli(argv: list[str]) -> tuple[float, dict]:
    import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        sys.stderr.write(stderr.getvalue()[-4000:])
        raise SystemExit(f"cli.main({argv[:2]}) failed (exit {code})")
    return seconds, json.loads(stdout.getvalue())


def inprocess_series(ckpt: Path, args, work: Path) -> list[dict]:
    cache, out = work / "cache", work / "output"
    rows = []
    for name, prompt, seed in SCENARIOS:
        seconds, summary = call_cli(run_args(ckpt, args, cache, out, prompt, seed))
        rows.append(row("in-process", name, seconds, summary["variations"][0]))
        progress(rows[-1])
        gc.collect()
    return rows


def sweep_series(ckpt: Path, args, work: Path) -> list[dict]:
    prompts = work / "prompts.txt"
    prompts.write_text(f"{PROMPT_A}\n{PROMPT_B}\n", encoding="utf-8")
    argv = run_args(ckpt, args, work / "cache", work / "output", None, None)
    argv += ["--sweep", f"seed={SEED_A},{SEED_B}", "--sweep", f"prompt=@{prompts}"]
    total, summary = call_cli(argv)
    names = ("first variation", "prompt-only change", "seed-only change", "seed + prompt (both seen)")
    rows = []
    for name, variation in zip(names, summary["variations"], strict=True):
        rows.append(row("sweep", name, sum(n["seconds"] for n in variation["nodes"]), variation))
        progress(rows[-1])
    rows.append(row("sweep", "whole invocation (4 variations)", total, None))
    return rows


def progress(r: dict) -> None:
    print(f"[bench] {r['series']:<10} {r['scenario']:<32} {r['seconds']:8.2f} s", file=sys.stderr, flush=True)


def print_table(rows: list[dict]) -> None:
    header = ("series", "scenario", "seconds", "ran", "from memory", "from disk", "not needed",
              "slowest node s")
    lines = [(r["series"], r["scenario"], f"{r['seconds']:.2f}",
              *("-" if r[k] is None else str(r[k]) for k in COUNTS), r["slowest"] or "-") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    right = {2, 3, 4, 5, 6}
    for i, line in enumerate([header, *lines]):
        cells = [x.rjust(w) if j in right else x.ljust(w)
                 for j, (x, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def summary_line(rows: list[dict], args) -> str:
    parts = [f"bench_caching {args.size} {args.width}x{args.height} steps={args.steps}"]
    for series in ("subprocess", "in-process"):
        got = {r["scenario"]: r for r in rows if r["series"] == series}
        if "first run" not in got:
            continue
        first = got["first run"]["seconds"]
        items = [f"first {first:.2f} s"]
        for name, short in (("identical re-run", "identical"), ("prompt-only change", "prompt-only"),
                            ("seed-only change", "seed-only")):
            s = got[name]["seconds"]
            items.append(f"{short} {s:.2f} s ({first / max(s, 1e-9):.1f}x, ran {got[name]['ran']})")
        parts.append(f"{series}: " + ", ".join(items))
    return " | ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=("tiny", "full"), help="random checkpoint shapes")
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of a random one")
    p.add_argument("--width", type=int, help="image width (default 64 tiny, 256 full)")
    p.add_argument("--height", type=int, help="image height (default 64 tiny, 256 full)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--series", default="subprocess,in-process,sweep",
                   help="comma-separated: subprocess, in-process, sweep (default all three)")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    args = p.parse_args()
    default_side = 64 if args.size == "tiny" else 256
    args.width = args.width or default_side
    args.height = args.height or default_side
    series = [s.strip() for s in args.series.split(",") if s.strip()]
    unknown = set(series) - {"subprocess", "in-process", "sweep"}
    if unknown:
        p.error(f"unknown series: {', '.join(sorted(unknown))}")

    ckpt = (args.checkpoint or ensure_checkpoint(OUT_DIR / f"sd15-random-{args.size}.safetensors", args.size))
    ckpt = ckpt.resolve()
    runners = {"subprocess": subprocess_series, "in-process": inprocess_series, "sweep": sweep_series}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sdgraph-bench-caching-") as tmp:
        for name in series:  # subprocess first: this process holds no model while the children run
            if name != "subprocess":
                import cli  # (imports nothing heavy itself)
                from sd import runtime

                runtime.setup()  # before mlx: picks the fast CPU BLAS
                cli.load_node_modules()  # imports are not part of the in-process timings
            work = Path(tmp) / name
            work.mkdir()
            rows += runners[name](ckpt, args, work)
            shutil.rmtree(work, ignore_errors=True)  # a full-size series leaves GBs of converted weights
            gc.collect()

    print(f"checkpoint: {ckpt} ({ckpt.stat().st_size / 2**20:.0f} MiB); {args.width}x{args.height}, "
          f"{args.steps} steps; load avg {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    print_table(rows)
    if args.json:
        print(json.dumps({"bench": "caching", "size": args.size, "width": args.width, "height": args.height,
                          "steps": args.steps, "rows": rows}))
    print(summary_line(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
