"""MLX backend settings sdgraph picks where the user has not: environment variables MLX reads once, when its
CUDA backend first runs, so `sd.runtime.setup()` sets them before any GPU work. A value the user set is
kept. Only Linux has MLX's CUDA backend; elsewhere nothing is set.

- ``MLX_MAX_MB_PER_BUFFER=32``: MLX frees a CUDA graph's buffers only once the graph has run; smaller graphs
  bound the memory of work in flight and cost the host less (measured, and what lost: docs/performance.md,
  "MLX settings").
- ``MLX_PTX_CACHE_DIR=<sdgraph cache>/kernels/mlx-<version>-ptx``: MLX keeps the kernels it compiles there
  instead of `/tmp/mlx/<version>/ptx`, which a reboot empties (sd/accel/gpu_cache.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULTS = {"MLX_MAX_MB_PER_BUFFER": "32"}

_applied: dict[str, str] = {}


def apply_defaults(kernel_dir: Path | None = None) -> None:
    """DEFAULTS, and MLX's kernel cache in sdgraph's `kernel_dir` (a folder per MLX version: a newer MLX must
    not load an older one's kernels)."""
    if not sys.platform.startswith("linux"):
        return
    defaults = dict(DEFAULTS)
    if kernel_dir is not None:
        defaults["MLX_PTX_CACHE_DIR"] = str(kernel_dir / f"mlx-{_mlx_version()}-ptx")
    for name, value in defaults.items():
        if name not in os.environ:
            os.environ[name] = value
            _applied[name] = value


def _mlx_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe() -> str:
    """One line for `sdgraph doctor`: each setting, and whether sdgraph or the user chose it."""
    parts = []
    for name in (*DEFAULTS, "MLX_PTX_CACHE_DIR"):
        if name in os.environ:
            who = "sdgraph default" if _applied.get(name) == os.environ[name] else "set by you"
            parts.append(f"{name}={os.environ[name]} ({who})")
    return ", ".join(parts) or "MLX defaults"
