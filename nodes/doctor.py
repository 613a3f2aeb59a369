"""`sdgraph doctor`: what this machine will run with, and a tiny end-to-end run to prove it works."""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

TINY_WORKFLOW = """
nodes:
  ckpt:     {type: LoadCheckpoint, ckpt_name: doctor.safetensors}
  positive: {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: a red cube on a table}
  negative: {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: blurry}
  latent:   {type: EmptyLatent, width: 64, height: 64}
  sampler:
    type: KSampler
    model: {from: ckpt.MODEL}
    positive: {from: positive.CONDITIONING}
    negative: {from: negative.CONDITIONING}
    latent_image: {from: latent.LATENT}
    steps: 2
  decode:   {type: VAEDecode, samples: {from: sampler.LATENT}, vae: {from: ckpt.VAE}}
  save:     {type: SaveImage, images: {from: decode.IMAGE}, filename_prefix: doctor}
"""


def _environment(out: TextIO) -> None:
    import mlx.core as mx

    from graph.disk_cache import DiskCache, default_cache_dir, human_size
    from sd.accel.precision import COMPONENTS, default_dtype, on_gpu
    from sd.runtime.blas import blas_in_use

    print(f"python:        {sys.version.split()[0]} ({platform.platform()})", file=out)
    print(f"mlx:           {getattr(mx, '__version__', 'unknown')}", file=out)
    device = mx.default_device()
    print(f"device:        {device} ({'GPU' if on_gpu() else 'CPU'})", file=out)
    print(f"blas (cpu):    {blas_in_use()}", file=out)
    if not on_gpu():
        from sd.accel import cpu_kernels

        print(f"cpu kernels:   {cpu_kernels.describe()}", file=out)
    else:
        from sd.accel import cuda_kernels
        from sd.runtime import mlx_settings

        print(f"cuda kernels:  {cuda_kernels.describe()}", file=out)
        print(f"mlx settings:  {mlx_settings.describe()}", file=out)
    dtypes = ", ".join(f"{c} {str(default_dtype(c)).removeprefix('mlx.core.')}" for c in COMPONENTS)
    print(f"dtypes:        {dtypes}", file=out)
    root = default_cache_dir()
    try:
        info = DiskCache(root).info() if root.exists() else None
    except OSError:
        info = None
    if info is None:
        print(f"cache:         {root} (empty)", file=out)
    else:
        sizes = [human_size(info[k]) for k in ("bytes", "max_bytes")]
        print(f"cache:         {root} ({info['entries']} entries, {sizes[0]}, budget {sizes[1]})", file=out)
    _switches(out)


def _switches(out: TextIO) -> None:
    """Every environment variable sdgraph reads: its value, and whether that is the default."""
    from sd.runtime.switches import current

    print("environment:", file=out)
    rows = current()
    width = max(len(s.name) for s, _, _ in rows)
    for s, value, is_default in rows:
        shown = "unset" if value is None else repr(value) if not value.strip() else value
        note = f"default: {s.default_text()}" if value is None or not value.strip() else (
            "the default" if is_default else f"set; default: {s.default_text()}")
        print(f"  {s.name.ljust(width)}  {shown} ({note})", file=out)


def _end_to_end(out: TextIO) -> bool:
    from graph.context import Folders
    from graph.disk_cache import DiskCache
    from graph.executor import Caches, Executor
    from graph.importers import load_workflow
    from graph.runner import prepare, run_variations
    from sd.synthetic import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="sdgraph-doctor-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        (root / "models" / "checkpoints").mkdir(parents=True)
        make_checkpoint(root / "models" / "checkpoints" / "doctor.safetensors")
        print(f"tiny random checkpoint written ({time.perf_counter() - start:.2f} s)", file=out)
        wf_path = root / "doctor.yaml"
        wf_path.write_text(TINY_WORKFLOW)
        folders = Folders(root / "models", root / "input", root / "output")
        executor = Executor(Caches(root / "cache", DiskCache(root / "cache")), folders)
        for attempt in ("first run", "identical re-run"):
            start = time.perf_counter()
            (outcome,) = run_variations(executor, prepare(load_workflow(wf_path), [], [], folders))
            ran = sum(r.status == "ran" for r in outcome.result.nodes)
            print(f"{attempt + ':':18}{time.perf_counter() - start:6.2f} s, {ran} nodes ran", file=out)
        images = list((root / "output").glob("doctor_*.png"))
        return len(images) == 1 and ran == 0


def run_doctor(out: TextIO | None = None) -> int:
    """Print the environment, then run a tiny txt2img workflow through the engine. 0 when all is well."""
    import nodes  # noqa: F401  (registers the nodes the check runs)

    out = out or sys.stdout  # looked up now, not at import (a replaced stream must be honoured)
    _environment(out)
    print("end-to-end check (tiny random checkpoint, 64x64, 2 steps):", file=out)
    try:
        ok = _end_to_end(out)
    except Exception as e:  # doctor reports every failure, whatever it is
        print(f"FAIL: {type(e).__name__}: {e}", file=out)
        return 1
    print("OK" if ok else "FAIL: the run did not produce exactly one image, or the re-run was not cached",
          file=out)
    return 0 if ok else 1
