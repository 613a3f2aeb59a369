"""C kernels for MLX's Linux CPU backend (attention, GEGLU, GroupNorm+SiLU, 3x3 convs), compiled on first use.

MLX's Linux CPU backend runs transcendental element-wise ops (exp, erf, sigmoid) scalar on one thread, and its
attention is matmul + single-threaded softmax + matmul; those were half of a UNet step on 2 cores
(docs/performance.md, "CPU"). `cpu_kernels.c` does them vectorised and OpenMP-parallel, with attention's GEMMs
in the BLAS that `sd.runtime.blas` loaded; large 3x3 convs become nine BLAS GEMMs without MLX's im2col buffer.
It is compiled with the system's C compiler (``CC``, else cc / gcc / clang) into ``<sdgraph cache>/kernels/``
(`sd.runtime.kernel_cache_dir()`), keyed by the source, compiler, flags and CPU, and loaded through ctypes --
only after `binary_cache.verified()`: the folder is 0700, and a library is loaded only if it is a regular file
of this user, writable by no one else, whose sha256 is the one recorded (`<name>.so.sha256`) when this code
built it; a planted, swapped or unrecorded library is removed and rebuilt, never loaded.

`available()` says whether they can be used; when not (no compiler, no BLAS, ``SDGRAPH_CPU_KERNELS=0``),
callers keep MLX's own ops, after at most one one-line warning. The wrappers take and return fp32
`mx.array`s; inputs are evaluated and read in place through numpy views (no copies).

`sd.runtime.setup()` prepares the process for them: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads would
spin and starve MLX's own threads on a small machine), the folder they build into, and glibc's
`keep_freed_memory()`, applied when they load: MLX's CPU backend has no buffer cache, and glibc returns
large blocks (mmap'ed, above 32 MB) to the kernel on free, so every large activation was page-faulted in
again, 4 KB at a time (a 42 MB add: 21 ms; with the pages kept: 1.8 ms). Loading them sets nothing else.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from sd import runtime
from sd.accel import binary_cache
from sd.runtime import switches

keep_freed_memory = runtime.keep_freed_memory  # it lives in sd.runtime (setup() decides when it applies)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Tried in order until one compiles: without -march=native the kernels still vectorise (SSE2), without
# OpenMP they run on one core.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp-simd"),
    ("-O3",),
)
# Queries per attention work item, and keys per scores tile (online softmax across tiles): the tile
# (256 x 512 fp32, 512 KB) stays in L2 and each GEMM call still amortises the BLAS's packing. UNet 4096-token
# self-attention, 2 cores: 256 x all keys 186 ms, 256 x 512 152 ms (bench/cpu_kernels_micro.py).
ATTENTION_BLOCK = 256
ATTENTION_KEY_BLOCK = 512

# conv3x3 pays from here on (pixels per image; with at least CONV_MIN_CHANNELS input channels): SD1.5 VAE
# decoder at 512x512, 128 channels: 645 -> 300 ms, 256x256x256: 258 -> 216 ms; UNet 64x64x320: 47 -> 40 ms;
# at 32x32 and below MLX's own is as fast or faster (bench/cpu_kernels_micro.py --only conv).
CONV_MIN_PIXELS = 64 * 64
CONV_MIN_CHANNELS = 64

_lib: ctypes.CDLL | None = None
# One kernel at a time: each already uses every core, and attention switches the BLAS to one thread and back
# (overlapping calls could restore each other's setting and leave MLX's matmuls single-threaded).
_call_lock = threading.Lock()
_failure: str | None = None     # why the kernels cannot be used (set once)
_warned = False


def disabled() -> bool:
    return not switches.flag("SDGRAPH_CPU_KERNELS")


def available() -> bool:
    """Whether the kernels can be used here (compiling them on the first call). Linux only: elsewhere MLX's
    CPU backend has Accelerate, and sd.runtime.blas loads no BLAS for the attention kernel."""
    return sys.platform.startswith("linux") and not disabled() and _load() is not None


def describe() -> str:
    """One line for `sdgraph doctor`."""
    if not sys.platform.startswith("linux"):
        return "not used (Linux only)"
    if disabled():
        return "off (SDGRAPH_CPU_KERNELS=0)"
    if not available():
        return f"unavailable: {_failure}"
    return f"{_library().sdk_threads()} threads, {_lib._name}"


def _warn(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"sdgraph: CPU kernels unavailable ({reason}); using MLX's slower CPU ops", file=sys.stderr)


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    text = platform.machine() + platform.system()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        text += platform.processor()
    return text


def _compiler_version(cc: list[str]) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cache_dir() -> Path:
    return runtime.kernel_cache_dir()


def build() -> Path:
    """Compile cpu_kernels.c (or reuse the cached library); raises RuntimeError when no flag set works."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found: install gcc or set CC")
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    folder = _cache_dir()
    cpu = _cpu_signature()
    targets = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join(x.encode() for x in (*cc, version, *flags, cpu)) + b"\0" + source)
        targets.append((flags, folder / f"cpu_kernels-{key.hexdigest()[:20]}.so"))
    for _, target in targets:
        if target.exists() or target.is_symlink():
            if binary_cache.verified(target):
                return target
            binary_cache.discard(target)  # planted, swapped or unrecorded: never loaded, rebuilt below
    errors = []
    binary_cache.private_dir(folder)
    binary_cache.remove_dead_builds(folder)
    for flags, target in targets:
        # compile to a private name, then rename: processes that race (distributed ranks) each end with a
        # complete file under the final name
        fd, tmp = tempfile.mkstemp(prefix=f".build-{os.getpid()}-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            proc = subprocess.run([*cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode == 0 and os.path.getsize(tmp) > 0:
                binary_cache.record(Path(tmp), target)
                os.replace(tmp, target)
                return target
            message = (proc.stderr or proc.stdout).strip()[:200] or f"exit status {proc.returncode}"
            errors.append(f"{' '.join(flags)}: {message}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{shlex.join(cc)} failed: {errors[0].splitlines()[0]}")


def _blas_functions() -> tuple[int, int, int]:
    """Addresses of cblas_sgemm and (0 if absent) openblas_set/get_num_threads of sd.runtime.blas's library
    (the one MLX's matmuls use)."""
    from sd.runtime import blas

    name = blas.load_fast_blas()
    if name is None:
        raise RuntimeError("no optimised BLAS loaded (see sdgraph doctor)")
    lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)

    def address(symbol: str) -> int:
        return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value if hasattr(lib, symbol) else 0

    return address("cblas_sgemm"), address("openblas_set_num_threads"), address("openblas_get_num_threads")


def _load() -> ctypes.CDLL | None:
    global _lib, _failure
    if _lib is not None or _failure is not None:
        return _lib
    try:
        sgemm, set_threads, get_threads = _blas_functions()
        path = build()
        lib = ctypes.CDLL(str(path))  # libgomp reads OMP_WAIT_POLICY now (sd.runtime.setup sets it)
    except (RuntimeError, OSError) as e:
        _failure = str(e)
        _warn(_failure)
        return None
    _declare(lib)
    lib.sdk_set_blas(sgemm, set_threads or None, get_threads or None)
    runtime.cpu_kernels_loaded()  # glibc keeps freed memory, if setup() asked for it
    _lib = lib
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.sdk_set_blas.argtypes = [p, p, p]
    lib.sdk_threads.restype = ctypes.c_int
    for name in ("sdk_exp", "sdk_erf", "sdk_silu"):
        getattr(lib, name).argtypes = [p, p, i]
    lib.sdk_geglu.argtypes = [p, p, i, i]
    lib.sdk_group_norm.argtypes = [p, p, i, i, i, i, p, p, f, ctypes.c_int]
    lib.sdk_group_norm.restype = ctypes.c_int
    lib.sdk_attention.argtypes = [p, i, i, p, i, i, p, i, i, p, i, i, i, i, i, f, i, i]
    lib.sdk_attention.restype = ctypes.c_int
    lib.sdk_conv3x3.argtypes = [p, p, p, p, i, i, i, i, i, p, p]
    lib.sdk_conv3x3.restype = ctypes.c_int


def _library() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {_failure}")
    return lib


# ------------------------------------------------------------------------------------------ wrappers
def _view(a: mx.array) -> np.ndarray:
    """An evaluated fp32 mx.array as a numpy view of its buffer (MLX exports its strides; no copy)."""
    if a.dtype != mx.float32:
        raise TypeError(f"CPU kernels take float32, got {a.dtype}")
    return np.asarray(a)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _contiguous(a: mx.array) -> np.ndarray:
    v = _view(a)
    return v if v.flags["C_CONTIGUOUS"] else np.ascontiguousarray(v)


def elementwise(name: str, x: mx.array) -> mx.array:
    """"exp" | "erf" | "silu" over all elements (used to check the approximations)."""
    mx.eval(x)
    xv = _contiguous(x)
    out = np.empty_like(xv)
    with _call_lock:
        getattr(_library(), f"sdk_{name}")(_address(xv), _address(out), xv.size)
    return mx.array(out)


def geglu(h: mx.array) -> mx.array:
    """h [..., 2F] (value | gate) -> value * gelu(gate) [..., F], exact-erf GELU."""
    mx.eval(h)
    hv = _contiguous(h)
    f = hv.shape[-1] // 2
    out = np.empty(hv.shape[:-1] + (f,), np.float32)
    with _call_lock:
        _library().sdk_geglu(_address(hv), _address(out), hv.size // (2 * f), f)
    return mx.array(out)


def group_norm(x: mx.array, groups: int, weight: mx.array | None, bias: mx.array | None, eps: float,
               silu: bool = False) -> mx.array:
    """GroupNorm over channels-last x [B, ..., C] (as nn.GroupNorm(pytorch_compatible=True)), then SiLU
    when `silu`."""
    c = x.shape[-1]
    weight = mx.ones((c,), mx.float32) if weight is None else weight
    bias = mx.zeros((c,), mx.float32) if bias is None else bias
    mx.eval(x, weight, bias)
    xv, wv, bv = _contiguous(x), _contiguous(weight), _contiguous(bias)
    out = np.empty_like(xv)
    pixels = xv.size // (xv.shape[0] * c)
    with _call_lock:
        rc = _library().sdk_group_norm(_address(xv), _address(out), xv.shape[0], pixels, c, groups,
                                       _address(wv), _address(bv), eps, int(silu))
    if rc != 0:
        raise MemoryError("sdk_group_norm: out of memory")
    return mx.array(out)


def _rows(a: np.ndarray) -> np.ndarray:
    """a [B, L, W] as the kernel reads it: unit stride along W, rows at least W apart (a BLAS leading
    dimension; rows may be further apart, e.g. one third of a fused qkv buffer), batches at a stride >= 0
    (0: broadcast). Anything else is copied."""
    e = a.itemsize
    if (a.ndim != 3 or a.strides[2] != e or a.strides[1] < a.shape[2] * e or a.strides[0] < 0
            or a.strides[1] % e or a.strides[0] % e):
        return np.ascontiguousarray(a)
    return a


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float,
              block: int = ATTENTION_BLOCK, key_block: int = ATTENTION_KEY_BLOCK) -> mx.array:
    """softmax(scale q k^T) v per head. q [B, Lq, heads*D], k/v [B, Lk, heads*D] as the projections give
    them (strided views of a fused qkv buffer are read in place) -> [B, Lq, heads*D]."""
    mx.eval(q, k, v)
    qv, kv, vv = (_rows(_view(t)) for t in (q, k, v))
    b, lq, inner = qv.shape
    lk = kv.shape[1]
    out = np.empty((b, lq, inner), np.float32)
    e = qv.itemsize
    with _call_lock:
        rc = _library().sdk_attention(
            _address(qv), qv.strides[0] // e, qv.strides[1] // e, _address(kv), kv.strides[0] // e,
            kv.strides[1] // e, _address(vv), vv.strides[0] // e, vv.strides[1] // e, _address(out),
            b, heads, lq, lk, inner // heads, scale, block, key_block)
    if rc != 0:
        raise RuntimeError(f"sdk_attention failed ({'no BLAS' if rc == -1 else 'out of memory'})")
    return mx.array(out)


def conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """3x3 convolution, stride 1, zero padding 1: x [B, H, W, Cin], weight [Cout, 3, 3, Cin] (nn.Conv2d's),
    bias [Cout] or None -> [B, H, W, Cout]; nine multithreaded GEMMs over one padded copy of x, no im2col.
    Pays over MLX's conv (im2col + GEMM) for large images: see `CONV_MIN_PIXELS`."""
    arrays = [x, weight] + ([] if bias is None else [bias])
    mx.eval(*arrays)
    xv, wv = _contiguous(x), _contiguous(weight)
    bv = None if bias is None else _contiguous(bias)
    b, h, w, cin = xv.shape
    cout = wv.shape[0]
    rows = b * (h + 2) * (w + 2)
    padded = np.empty((rows + 2 * (w + 3)) * cin, np.float32)
    acc = np.empty(rows * cout, np.float32)
    out = np.empty((b, h, w, cout), np.float32)
    with _call_lock:
        rc = _library().sdk_conv3x3(_address(xv), _address(wv), None if bv is None else _address(bv),
                                    _address(out), b, h, w, cin, cout, _address(padded), _address(acc))
    if rc != 0:
        raise RuntimeError("sdk_conv3x3: no BLAS")
    return mx.array(out)
