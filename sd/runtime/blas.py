"""Give MLX's Linux CPU backend a real BLAS.

MLX's Linux CPU wheel links the *reference* BLAS (~4-8 GFLOP/s here). Loading an optimised library that
exports the standard ``cblas_*`` symbols with RTLD_GLOBAL *before* ``mlx.core`` is imported makes the
dynamic linker bind MLX's calls to it instead: ~100+ GFLOP/s and 3x3 convs ~20-40x faster on 2 cores.
macOS needs nothing (MLX uses Metal/Accelerate there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Tried in order. Debian/Ubuntu `libopenblas0-pthread` provides the first; MKL and BLIS also export cblas_*.
_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so",
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "libblis.so.4",
)

_loaded: str | None = None
_warned = False


def _try_load(name: str) -> bool:
    try:
        lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm")


def load_fast_blas() -> str | None:
    """Load an optimised BLAS for MLX's CPU backend; returns its name, or None (with a one-line warning).

    ``SDGRAPH_BLAS`` may name a library path to use, or ``none`` to keep MLX's bundled reference BLAS.
    """
    global _loaded, _warned
    if _loaded is not None or sys.platform != "linux":
        return _loaded
    choice = os.environ.get("SDGRAPH_BLAS", "").strip()
    if choice.lower() == "none":
        return None
    if "mlx.core" in sys.modules and not _warned:
        # Too late: symbols are already bound to the reference BLAS.
        _warned = True
        print("sdgraph: mlx was imported before sdgraph; CPU matmuls use the slow reference BLAS",
              file=sys.stderr)
        return None
    candidates = (choice,) if choice else _CANDIDATES + tuple(
        n for n in (ctypes.util.find_library("openblas"),) if n)
    for name in candidates:
        if _try_load(name):
            _loaded = name
            return name
    if not _warned:
        _warned = True
        print("sdgraph: no optimised BLAS found, CPU runs will be slow; install one with "
              "`sudo apt-get install libopenblas0-pthread` (or set SDGRAPH_BLAS=/path/to/libopenblas.so)",
              file=sys.stderr)
    return None


def blas_in_use() -> str:
    """A short description for `sdgraph doctor`."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return _loaded or "MLX reference BLAS (slow)"
