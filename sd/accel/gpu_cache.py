"""Where compiled GPU kernels persist, and the one-line notice when a run has to compile them.

On NVIDIA, MLX JIT-compiles every fused graph with NVRTC (~5 s each) and keeps the result in
`MLX_PTX_CACHE_DIR` (its default, `/tmp/mlx/<version>/ptx`, is emptied by a reboot); sdgraph's own CUDA
kernels are cubins in the same kernel folder (sd/accel/cuda_kernels.py). `sd.runtime.setup()` points MLX at
`<sdgraph cache>/kernels/mlx-<version>-ptx` unless the user set the variable, so both survive reboots and
`sdgraph cache info` / `clear` see them. `prepare()` (called when an accelerated model is first made) creates
the folders private and, on a GPU whose kernels are not compiled yet, says once that this run compiles them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_state = {"prepared": False, "announced": False}


def ptx_dir() -> Path | None:
    """MLX's kernel folder as this process will use it (None: MLX's own default)."""
    value = os.environ.get("MLX_PTX_CACHE_DIR")
    return Path(value) if value else None


def announce(reason: str = "") -> None:
    """Print, once per process, that GPU kernels are being compiled (a first run on this GPU)."""
    if _state["announced"]:
        return
    _state["announced"] = True
    print("sdgraph: compiling GPU kernels for this GPU (first run only; about a minute, kept for later runs"
          f"{': ' + reason if reason else ''}). `sdgraph warmup` does it ahead of time.",
          file=sys.stderr, flush=True)


def prepare() -> None:
    import mlx.core as mx

    if _state["prepared"]:
        return
    _state["prepared"] = True
    if not mx.cuda.is_available():
        return
    from sd.accel import binary_cache

    folder = ptx_dir()
    if folder is None:
        return
    try:
        binary_cache.private_dir(folder.parent)
        folder.mkdir(mode=0o700, exist_ok=True)
        empty = not any(folder.glob("*.ptx"))
    except (OSError, RuntimeError):
        return  # MLX then compiles in memory only; nothing to say here that MLX would not
    if empty:
        announce(f"{folder.parent}")
