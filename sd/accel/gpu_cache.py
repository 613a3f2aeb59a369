"""Where compiled GPU kernels persist, and the one-line notice when a run has to compile them.

On NVIDIA, MLX JIT-compiles every fused graph with NVRTC (~5 s each) and keeps the result in
`MLX_PTX_CACHE_DIR` (its default, `/tmp/mlx/<version>/ptx`, is emptied by a reboot); sdgraph's own CUDA
kernels are cubins in the same kernel folder (sd/accel/cuda_kernels.py). `sd.runtime.setup()` points MLX at
`<sdgraph cache>/kernels/mlx-<version>-ptx` unless the user set the variable, so both survive reboots and
`sdgraph cache info` / `clear` see them. `prepare()` (called when an accelerated model is first made) creates
the folders private and, on a GPU whose kernels are not compiled yet, says once that this run compiles them.

Whether a model's forward runs as one compiled graph (`wants_compile`): on NVIDIA, compiling a full-size
UNet + VAE costs minutes of NVRTC the first time, and the uncompiled forward (MLX's prebuilt kernels plus
sdgraph's cubins) renders a 512² image in seconds. So by default (`SDGRAPH_COMPILE=auto`) a graph is
compiled only once MLX's cache holds its kernels: a marker per graph in the kernel folder, written by a run
that compiled it (`sdgraph warmup`, or `SDGRAPH_COMPILE=1`). Elsewhere (Metal compiles in milliseconds; the
CPU path has its own kernels) compiling stays the default. Figures: docs/performance.md, "Cold start".
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

_state = {"prepared": False, "announced": False}


def ptx_dir() -> Path | None:
    """MLX's kernel folder as this process will use it (None: MLX's own default)."""
    value = os.environ.get("MLX_PTX_CACHE_DIR")
    return Path(value) if value else None


def announce(reason: str = "", duration: str = "seconds") -> None:
    """Print, once per process, that GPU kernels are being compiled (a first run on this GPU)."""
    if _state["announced"]:
        return
    _state["announced"] = True
    print(f"sdgraph: compiling GPU kernels for this GPU (first run only; {duration}, kept for later runs"
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
    from sd.runtime import switches

    if empty and switches.auto_flag("SDGRAPH_COMPILE"):  # forced on: this run compiles the graphs too
        announce(f"{folder.parent}", "a few minutes")


def graph_key(name: str, module, options) -> str:
    """A compiled graph's identity across processes: what it computes (`name`, e.g. "unet" or "vae.decode"),
    its parameters' names, shapes and dtypes (the architecture, not the weights) and the levers."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256(f"{name}|{options!r}".encode())
    for key, value in tree_flatten(module.parameters()):
        h.update(f"|{key}:{tuple(value.shape)}:{value.dtype}".encode())
    return f"{name}-{h.hexdigest()[:20]}"


def _marker(key: str) -> Path | None:
    folder = ptx_dir()
    return None if folder is None else folder / "sdgraph-compiled" / key


def wants_compile(key: str, *, cuda: bool | None = None) -> bool:
    """Whether the graph `key` should be compiled in this process (see the module docstring); a graph that
    will be compiled is marked as built for later runs."""
    from sd.runtime import switches

    choice = switches.auto_flag("SDGRAPH_COMPILE")
    if choice is False:
        return False
    if cuda is None:
        import mlx.core as mx

        cuda = mx.cuda.is_available()
    marker = _marker(key)
    if choice is None and cuda and marker is not None and not marker.exists():
        _say_uncompiled()
        return False
    if cuda and marker is not None:
        try:
            marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # a read-only cache: later runs go uncompiled again, which is only slower
    return True


def _say_uncompiled() -> None:
    if _state.get("uncompiled_said"):
        return
    _state["uncompiled_said"] = True
    print("sdgraph: running without compiled GPU graphs (not built on this GPU yet: compiling them takes "
          "minutes; uncompiled steps are slower). `sdgraph warmup` builds them once for later runs.",
          file=sys.stderr, flush=True)
