"""Give MLX's Linux CPU backend a real BLAS.

MLX's Linux CPU wheel links the *reference* BLAS (~4-8 GFLOP/s here). Loading an optimised library that
exports the standard ``cblas_*`` symbols with RTLD_GLOBAL *before* ``mlx.core`` is imported makes the
dynamic linker bind MLX's calls to it instead: ~100+ GFLOP/s and 3x3 convs ~20-40x faster on 2 cores.
macOS needs nothing (MLX uses Metal/Accelerate there).

OpenBLAS picks its kernels from the CPU's model number, and a model it does not know falls back to the
generic SSE3 "Prescott" kernels: Debian's 0.3.21 does so on a Sapphire Rapids VM, 33 GFLOP/s where its
AVX-512 kernels run 160-250 (docs/performance.md, "OPENBLAS_CORETYPE"). So, unless the user set
``OPENBLAS_CORETYPE``, set-up names the kernel family the CPU's flags allow before loading the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable

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
_core_chosen: str | None = None   # the OPENBLAS_CORETYPE set-up chose (None: the user's or OpenBLAS's own)

# OpenBLAS kernel families by the x86 flags they need, best first. Cooperlake, Sapphire Rapids and Zen 4/5
# run the SkylakeX sgemm kernels; AMD Zen 1-3 run the Haswell ones.
_X86_CORES = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)


def cpu_flags(cpuinfo_lines: Iterable[str]) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo's lines (the kernel lists only what the
    OS has enabled, e.g. no avx512 flags when it does not save the AVX-512 registers). Stops at the first
    "flags" line, so a many-core machine's file is not generated in full."""
    for line in cpuinfo_lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def openblas_core_for(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family these x86 flags allow, or None (not x86, or nothing better than generic)."""
    for core, needs in _X86_CORES:
        if needs <= flags:
            return core
    return None


def this_cpus_openblas_core() -> str | None:
    """openblas_core_for() this machine's CPU (None where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return openblas_core_for(cpu_flags(f))
    except OSError:
        return None


def _choose_openblas_core() -> None:
    global _core_chosen
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    core = this_cpus_openblas_core()
    if core:
        # OpenBLAS reads it when the library loads (its constructor), so this must come first.
        os.environ["OPENBLAS_CORETYPE"] = core
        _core_chosen = core


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
    _choose_openblas_core()
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


def openblas_core() -> str | None:
    """The kernel family the loaded OpenBLAS runs (None: not OpenBLAS, or not loaded)."""
    if _loaded is None:
        return None
    try:
        get = ctypes.CDLL(_loaded).openblas_get_corename
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_char_p
    return get().decode(errors="replace")


def blas_in_use() -> str:
    """A short description for `sdgraph doctor`."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _loaded is None:
        return "MLX reference BLAS (slow)"
    core = openblas_core()
    if core is None:
        return _loaded
    how = ("chosen by sdgraph from the CPU flags" if _core_chosen
           else "OPENBLAS_CORETYPE" if "OPENBLAS_CORETYPE" in os.environ else "OpenBLAS's own choice")
    return f"{_loaded} (kernels: {core}, {how})"
