"""Process set-up: the BLAS MLX uses on a Linux CPU, MLX backend settings, the CPU kernels' folder, switches.

Importing any part of `sd` does nothing. A program that runs models calls `setup()` once, first thing,
before anything imports ``mlx.core`` (the CLI, the tests' conftest and the bench entry points do):

- loads an optimised BLAS for MLX's Linux CPU backend (blas.py; too late once mlx is imported, which it
  says on stderr), first naming the OpenBLAS kernels the CPU's flags allow unless OPENBLAS_CORETYPE is set,
- sets sdgraph's defaults for MLX's CUDA backend where the user has not (mlx_settings.py), among them MLX's
  kernel cache inside sdgraph's kernel folder,
- sets ``OMP_WAIT_POLICY=PASSIVE`` unless set (idle OpenMP threads of the CPU kernels would otherwise spin
  and starve MLX's own threads on a small machine; libgomp reads it when the kernels load),
- records the folder the CPU kernels are compiled into (``<cache_dir>/kernels``),
- asks for `keep_freed_memory()` (glibc Linux), applied when the CPU kernels are loaded, i.e. only in a
  process that runs them (CPU device), as before.

It is idempotent: a second call only changes the kernel folder, when given one (it matters until the
kernels are first built). Without `setup()` the kernels build into the platform cache folder
(`default_cache_dir()`), nothing else is set, and MLX keeps its reference BLAS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sd.runtime import blas, mlx_settings

_done = False
_kernel_dir: Path | None = None
_keep_freed_memory = False       # setup() asks for it; the CPU kernels apply it when they load
_memory_kept: bool | None = None  # whether keep_freed_memory() applied (None: not tried)


def setup(cache_dir: Path | str | None = None) -> None:
    """Prepare this process for running models (see the module docstring). `cache_dir`: the sdgraph
    cache folder the CPU kernels are compiled into (as `<cache_dir>/kernels`)."""
    global _done, _kernel_dir, _keep_freed_memory
    if cache_dir is not None:
        _kernel_dir = Path(cache_dir) / "kernels"
    if _done:
        return
    _done = True
    blas.load_fast_blas()
    mlx_settings.apply_defaults(kernel_cache_dir())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _keep_freed_memory = sys.platform.startswith("linux")


def default_cache_dir() -> Path:
    """SDGRAPH_CACHE_DIR, else the platform's user cache folder + /sdgraph (the same folder as
    graph.disk_cache.default_cache_dir; sd does not import graph)."""
    env = os.environ.get("SDGRAPH_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sdgraph"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdgraph"


def kernel_cache_dir() -> Path:
    """Where the CPU kernels are compiled into: setup()'s `<cache_dir>/kernels`, else the default's."""
    return _kernel_dir if _kernel_dir is not None else default_cache_dir() / "kernels"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed large blocks in the heap for reuse (no mmap per allocation, no trim
    below 1 GB), so MLX's big CPU buffers are not page-faulted in anew each time. Process-wide: the heap
    stays at its peak until exit. Returns whether it applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def cpu_kernels_loaded() -> None:
    """Called by sd.accel.cpu_kernels once its library is loaded: applies the memory policy setup() chose."""
    global _memory_kept
    if _keep_freed_memory and _memory_kept is None:
        _memory_kept = keep_freed_memory()
