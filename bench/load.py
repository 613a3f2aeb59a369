"""Checkpoint load time (cold and warm page cache) and peak RSS, each load in a fresh process.

Run as a module by the bench: `python -m bench.load IMPL PATH` prints one JSON line. IMPL is `mlx`
(sd.loading.checkpoint.load_checkpoint, all three parts, evaluated) or `diffusers` (safetensors/torch.load
of the file, convert_ldm_* and load_state_dict into diffusers/transformers modules: what a single-file load
does without the hub).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import drop_file_cache


def _load_mlx(path: str, dtype: str | None) -> None:
    from sd.loading.checkpoint import load_checkpoint

    load_checkpoint(path, dtype=dtype)


def _load_diffusers(path: str, dtype: str | None) -> None:
    import torch

    from sd.loading.checkpoint import split_components
    from sd.loading.detect import detect_unet_config
    from sd.models.clip import clip_config_from_weights
    from sd.models.vae import vae_config_from_weights
    from tests import reference

    state = reference.read_state(path)
    parts = split_components({k: tuple(v.shape) for k, v in state.items()})
    tdtype = torch.float16 if dtype in ("float16", "fp16") else torch.float32
    unet_state = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    unet = reference.diffusers_unet(detect_unet_config(path, parts["unet"]), unet_state)
    vae = reference.diffusers_vae(vae_config_from_weights(parts["vae"]),
                                  {k: v for k, v in state.items() if k.startswith("first_stage_model.")})
    clip = reference.transformers_clip(clip_config_from_weights(parts["clip"]),
                                       {k: v for k, v in state.items() if k.startswith("cond_stage_model.")})
    for m in (unet, vae, clip):
        m.to(tdtype)


def child(impl: str, path: str, dtype: str | None) -> None:
    from sd import runtime

    runtime.setup()  # fast BLAS before mlx
    import sd.loading.checkpoint  # noqa: F401  imports are not part of the load time
    import sd.models.clip  # noqa: F401
    import sd.models.unet  # noqa: F401
    import sd.models.vae  # noqa: F401

    if impl != "mlx":
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from diffusers.loaders import single_file_utils  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401

        from tests import reference  # noqa: F401
    before = _hwm()
    start = time.perf_counter()
    (_load_mlx if impl == "mlx" else _load_diffusers)(path, dtype)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": _hwm(), "rss_before": before}))


def _hwm() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it starts afresh at exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(impl: str, path: Path, cold: bool, dtype: str | None = None) -> dict:
    dropped = drop_file_cache(path) if cold else None
    if not cold:  # make sure it is cached
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "bench.load", impl, str(path), dtype or ""],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"load child failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cache_dropped"] = dropped
    return result


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3] or None)
