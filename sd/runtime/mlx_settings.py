"""MLX backend settings sdgraph picks where the user has not: environment variables MLX reads once, when its
CUDA backend first runs, so `sd.runtime.setup()` sets them before any GPU work. A value the user set is
kept. Only Linux has MLX's CUDA backend; elsewhere nothing is set.

- ``MLX_MAX_MB_PER_BUFFER=32``: MLX frees a CUDA graph's buffers only once the graph has run; smaller graphs
  bound the memory of work in flight and cost the host less (measured, and what lost: docs/performance.md,
  "MLX settings").
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
