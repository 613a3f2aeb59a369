"""MLX backend settings sdgraph picks where the user has not: environment variables MLX reads once, when its
CUDA backend first runs, so they are set when `sd` is imported (before any GPU work). A value the user set
is kept. Only Linux has MLX's CUDA backend; elsewhere nothing is set.

- ``MLX_USE_CUDA_GRAPHS=0``: by default MLX's CUDA backend records every kernel into CUDA graphs. A CFG UNet
  step of SD1.5 is ~750 small kernels, and recording them costs the host more than launching them directly:
  on the H200, a 20-step sampling loop went from 13.2 to 10.4 ms per step (BENCHMARKS.md).
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"MLX_USE_CUDA_GRAPHS": "0"}

_applied: dict[str, str] = {}


def apply_defaults() -> None:
    if not sys.platform.startswith("linux"):
        return
    for name, value in DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            _applied[name] = value


def describe() -> str:
    """One line for `sdgraph doctor`: each setting, and whether sdgraph or the user chose it."""
    parts = []
    for name in DEFAULTS:
        if name in os.environ:
            who = "sdgraph default" if _applied.get(name) == os.environ[name] else "set by you"
            parts.append(f"{name}={os.environ[name]} ({who})")
    return ", ".join(parts) or "MLX defaults"
