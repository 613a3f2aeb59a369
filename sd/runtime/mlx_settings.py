"""MLX backend settings sdgraph picks where the user has not: environment variables MLX reads once, when its
CUDA backend first runs, so they are set when `sd` is imported (before any GPU work). A value the user set
is kept. Only Linux has MLX's CUDA backend; elsewhere nothing is set.

- ``MLX_MAX_MB_PER_BUFFER=32``: MLX's CUDA backend records kernels into CUDA graphs and frees the buffers of
  a graph's work only once that graph has run. Closing each graph at 32 MB of new buffers bounds the memory
  of work in flight, and the smaller graphs cost the host less to build. H200, SD1.5 at 512x512, same
  machine (BENCHMARKS.md): txt2img peak 4036 -> 3153 MiB (diffusers 3489); a UNet step's working memory
  1.5-1.8 GB -> 0.7-0.8 GB; a 20-step UNet loop 13.2 -> 11.0 ms per step.
  (Tried and not kept: ``MLX_USE_CUDA_GRAPHS=0``, launching kernels directly: as fast, but MLX then holds
  every buffer of an evaluation until all of it has run, and the txt2img peak rose to 4.2-6.2 GB.)
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"MLX_MAX_MB_PER_BUFFER": "32"}

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
