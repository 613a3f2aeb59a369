"""Compile CUDA C++ to a cubin with NVRTC, through ctypes: no CUDA toolkit install, no new dependency.

MLX's CUDA build compiles its own kernels with NVRTC, so wherever it runs the library is there: already
loaded into the process by libmlx, or in the `nvidia-cuda-nvrtc` wheel that MLX's CUDA build and PyTorch
depend on. The headers a kernel includes (cuda_fp16.h, cuda_bf16.h) come from the same places MLX takes
them: CUDA_HOME / CUDA_PATH / /usr/local/cuda, or an `nvidia/*/include` folder of the installed wheels.

`compile_cubin(source, arch)` returns the binary for one GPU architecture ("sm_90"); sd/accel/cuda_kernels.py
keeps it in the kernel cache, so a machine compiles each kernel once instead of every process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from functools import cache
from pathlib import Path

_SONAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")


class NvrtcError(RuntimeError):
    """NVRTC is missing or could not compile a kernel (the message says which)."""


def _site_folders() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def _wheel_libraries() -> list[str]:
    found = []
    for folder in _site_folders():
        found += sorted(glob.glob(str(folder / "nvidia" / "*" / "lib" / "libnvrtc.so*")))
        found += sorted(glob.glob(str(folder / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so*")))
    return [f for f in found if "builtins" not in f and "alt" not in Path(f).name]


@cache
def library() -> ctypes.CDLL:
    """The NVRTC shared library (the one libmlx loaded, when it did: dlopen by soname returns it)."""
    errors = []
    for name in (*_SONAMES, *_wheel_libraries(), ctypes.util.find_library("nvrtc")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e).split(":")[-1].strip())
            continue
        _declare(lib)
        return lib
    raise NvrtcError("NVRTC not found (libnvrtc.so.13 / .12; install the nvidia-cuda-nvrtc wheel)")


def _declare(lib: ctypes.CDLL) -> None:
    p, c, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(p), c, c, ctypes.c_int, ctypes.POINTER(c),
                                       ctypes.POINTER(c)]
    lib.nvrtcCompileProgram.argtypes = [p, ctypes.c_int, ctypes.POINTER(c)]
    lib.nvrtcGetProgramLogSize.argtypes = [p, ctypes.POINTER(sz)]
    lib.nvrtcGetProgramLog.argtypes = [p, c]
    lib.nvrtcGetCUBINSize.argtypes = [p, ctypes.POINTER(sz)]
    lib.nvrtcGetCUBIN.argtypes = [p, c]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(p)]
    lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = c


def version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return f"{major.value}.{minor.value}"


def _check(result: int, what: str) -> None:
    if result != 0:
        message = library().nvrtcGetErrorString(result)
        raise NvrtcError(f"{what} failed: {message.decode() if message else result}")


@cache
def include_folders() -> tuple[str, ...]:
    """Folders holding cuda_fp16.h, where MLX's JIT looks for it too (CUDA_HOME first)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    folders = [str(Path(c) / "include") for c in candidates if c]
    for folder in _site_folders():
        folders += sorted(glob.glob(str(folder / "nvidia" / "*" / "include")))
    return tuple(dict.fromkeys(f for f in folders if (Path(f) / "cuda_fp16.h").is_file()))


def compile_cubin(source: str, arch: str, name: str = "kernel.cu") -> bytes:
    """`source` compiled for `arch` ("sm_90"); raises NvrtcError with NVRTC's log when it does not compile."""
    lib = library()
    includes = include_folders()
    if not includes:
        raise NvrtcError("CUDA headers (cuda_fp16.h) not found: set CUDA_HOME to the CUDA install")
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17",
                   *(f"--include-path={f}" for f in includes)]
        array = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        result = lib.nvrtcCompileProgram(prog, len(options), array)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace")[:4000]
            raise NvrtcError(f"{name} does not compile for {arch}:\n{text}")
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        out = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
        return out.raw[: size.value]
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@cache
def gpu_architecture() -> tuple[str, str]:
    """("sm_90", driver version) of the GPU MLX runs on, from the CUDA driver (loaded by MLX already)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    _cuda(cuda.cuInit(0), "cuInit")
    device = ctypes.c_int()
    _cuda(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")  # MLX's device (CUDA_VISIBLE_DEVICES)
    major, minor, driver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _cuda(cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device), "cuDeviceGetAttribute")  # CC major
    _cuda(cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device), "cuDeviceGetAttribute")  # CC minor
    _cuda(cuda.cuDriverGetVersion(ctypes.byref(driver)), "cuDriverGetVersion")
    return f"sm_{major.value}{minor.value}", str(driver.value)


def _cuda(result: int, what: str) -> None:
    if result != 0:
        raise NvrtcError(f"{what} failed (CUDA driver error {result})")
