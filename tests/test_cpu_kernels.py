"""sd/accel/cpu_kernels (C kernels for MLX's Linux CPU path) against MLX / numpy references, and FastOps
with them.

They must build wherever the tests run on Linux (CI installs gcc and OpenBLAS): a missing compiler fails
these tests instead of skipping them. Also: the fallback to MLX's ops with SDGRAPH_CPU_KERNELS=0 and with a
compiler that fails.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sd.accel import cpu_kernels
from sd.accel.compiled import FastUNet, FastVAE
from sd.accel.ops import FastOptions, options_here
from sd.loading.checkpoint import load_checkpoint
from sd.synthetic import make_checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="kernels for MLX's Linux CPU backend only")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.delenv("SDGRAPH_CPU_KERNELS", raising=False)
    assert cpu_kernels.available(), (
        f"CPU kernels did not build ({cpu_kernels._failure}): install a C compiler (gcc) and OpenBLAS "
        "(bash scripts/setup.sh)")


def rel_err(ours, ref) -> float:
    ours, ref = np.array(ours, dtype=np.float64), np.array(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------- element-wise maths
def test_exp_erf_silu_accuracy():
    x = np.linspace(-10, 10, 400_001).astype(np.float32)
    xd = x.astype(np.float64)
    erf = np.array(cpu_kernels.elementwise("erf", mx.array(x)), np.float64)
    assert np.abs(erf - np.array([math.erf(v) for v in xd])).max() <= 1.5e-7
    exp = np.array(cpu_kernels.elementwise("exp", mx.array(x * 8)), np.float64)
    assert np.abs(exp / np.exp(xd * 8) - 1).max() <= 2e-7
    silu = np.array(cpu_kernels.elementwise("silu", mx.array(x)), np.float64)
    ref = xd / (1 + np.exp(-xd))
    assert (np.abs(silu - ref) / np.maximum(np.abs(ref), 1e-30)).max() <= 3e-7
    # saturates instead of overflowing (softmax/SiLU of large magnitudes)
    big = np.array(cpu_kernels.elementwise("silu", mx.array(np.float32([-1e4, -100, 100, 1e4]))))
    assert np.isfinite(big).all() and np.allclose(big, [0, 0, 100, 1e4], atol=1e-30)


def test_keeps_freed_memory_for_reuse():
    """glibc keeps MLX's large freed buffers in the heap (no page faults on the next allocation)."""
    assert cpu_kernels.keep_freed_memory()


# ------------------------------------------------------------------------------------------------ GEGLU
def test_geglu_matches_mlx_gelu():
    h = mx.array(np.random.default_rng(0).standard_normal((3, 37, 2 * 24)).astype(np.float32) * 2)
    value, gate = mx.split(h, 2, axis=-1)
    ref = value * nn.gelu(gate)
    np.testing.assert_allclose(np.array(cpu_kernels.geglu(h)), np.array(ref), rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------- GroupNorm
def _group_norm(c: int, groups: int, seed: int) -> nn.GroupNorm:
    rng = np.random.default_rng(seed)
    gn = nn.GroupNorm(groups, c, pytorch_compatible=True)
    gn.weight = mx.array(rng.standard_normal(c).astype(np.float32))
    gn.bias = mx.array(rng.standard_normal(c).astype(np.float32))
    return gn


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((2, 5, 7, 64), 8), ((1, 3, 96), 32), ((2, 1, 1, 32), 32)])
def test_group_norm_matches_mlx(shape, groups, silu):
    x = mx.array(np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    gn = _group_norm(shape[-1], groups, 2)
    ref = nn.silu(gn(x)) if silu else gn(x)
    ours = cpu_kernels.group_norm(x, groups, gn.weight, gn.bias, gn.eps, silu=silu)
    assert ours.shape == x.shape
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_large_mean_does_not_cancel(silu):
    """Mean 1000, std 2: E[x^2] - E[x]^2 in fp32 would lose the variance; checked against float64."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 6, 5, 64)) * 2 + 1000).astype(np.float32)
    gn = _group_norm(64, 8, 4)
    xd = x.astype(np.float64).reshape(2, -1, 8, 8)
    mean, var = xd.mean(axis=(1, 3), keepdims=True), xd.var(axis=(1, 3), keepdims=True)
    ref = ((xd - mean) / np.sqrt(var + gn.eps)).reshape(x.shape) * np.array(gn.weight) + np.array(gn.bias)
    ref = ref / (1 + np.exp(-ref)) if silu else ref
    ours = np.array(cpu_kernels.group_norm(mx.array(x), 8, gn.weight, gn.bias, gn.eps, silu=silu))
    assert np.abs(ours - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------------- conv
@pytest.mark.parametrize("shape,cout,bias", [((2, 5, 7, 6), 4, True), ((1, 1, 1, 3), 5, True),
                                             ((2, 9, 8, 32), 16, False)])
def test_conv3x3_matches_mlx(shape, cout, bias):
    x = mx.array(np.random.default_rng(8).standard_normal(shape).astype(np.float32))
    conv = nn.Conv2d(shape[-1], cout, 3, padding=1, bias=bias)
    ours = cpu_kernels.conv3x3(x, conv.weight, conv.get("bias"))
    np.testing.assert_allclose(np.array(ours), np.array(conv(x)), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- attention
def _sdpa(q, k, v, heads, scale):
    def split(t):
        b, n, inner = t.shape
        return t.reshape(b, n, heads, inner // heads).transpose(0, 2, 1, 3)

    out = mx.fast.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    b, _, n, _ = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, n, -1)


@pytest.mark.parametrize("batch,lq,lk,heads,dim,block,key_block", [
    (2, 100, None, 8, 40, 32, 0),   # UNet level 1 self-attention (fused qkv), a partial last block
    (2, 100, None, 8, 40, 32, 24),  # keys in tiles (online softmax), a partial last tile
    (2, 61, 77, 8, 40, 128, 512),   # cross-attention to 77 context tokens (fused kv)
    (2, 61, 77, 8, 40, 16, 10),
    (2, 33, None, 4, 80, 16, 7),
    (1, 17, None, 2, 160, 5, 0),
    (1, 37, None, 1, 512, 64, 16),  # VAE mid-block: one head of 512 channels
])
def test_attention_matches_sdpa_on_fused_projections(batch, lq, lk, heads, dim, block, key_block):
    rng = np.random.default_rng(5)
    inner = heads * dim
    # scaled up: peaked softmax rows, whose maxima move between key tiles
    fused = mx.array(rng.standard_normal((batch, lq, 3 * inner)).astype(np.float32) * 2)
    q, k, v = mx.split(fused, 3, axis=-1)
    if lk is not None:
        context = mx.array(rng.standard_normal((batch, lk, 2 * inner)).astype(np.float32))
        k, v = mx.split(context, 2, axis=-1)
    scale = dim ** -0.5
    ours = cpu_kernels.attention(q, k, v, heads, scale, block=block, key_block=key_block)
    assert ours.shape == (batch, lq, inner)
    np.testing.assert_allclose(np.array(ours), np.array(_sdpa(q, k, v, heads, scale)), rtol=1e-5, atol=3e-5)


def test_attention_reads_fused_thirds_in_place():
    """The thirds of a fused qkv buffer are strided views into it (no copies before the kernel)."""
    fused = mx.array(np.random.default_rng(6).standard_normal((2, 10, 3 * 16)).astype(np.float32))
    q, k, _ = mx.split(fused, 3, axis=-1)
    mx.eval(fused, q, k)
    base, qv, kv = (cpu_kernels._rows(np.asarray(t)) for t in (fused, q, k))
    assert qv.strides == (10 * 48 * 4, 48 * 4, 4) and not qv.flags["C_CONTIGUOUS"]
    assert cpu_kernels._address(qv) == cpu_kernels._address(base)
    assert cpu_kernels._address(kv) == cpu_kernels._address(base) + 16 * 4


def test_attention_copies_layouts_a_blas_cannot_read():
    """Broadcast rows (stride 0), reversed tokens and transposed inputs are copied first, not misread."""
    rng = np.random.default_rng(9)
    q = mx.array(rng.standard_normal((2, 12, 32)).astype(np.float32))
    row = mx.array(rng.standard_normal((2, 1, 32)).astype(np.float32))
    k = mx.broadcast_to(row, (2, 7, 32))                                  # every key the same row
    v = mx.array(rng.standard_normal((2, 32, 7)).astype(np.float32)).transpose(0, 2, 1)
    q_reversed = q[:, ::-1, :]
    for qq in (q, q_reversed):
        ours = cpu_kernels.attention(qq, k, v, 4, 0.3)
        np.testing.assert_allclose(np.array(ours), np.array(_sdpa(qq, k, v, 4, 0.3)), rtol=1e-5, atol=1e-5)


def test_attention_from_threads_at_once():
    """Work items call the BLAS from every OpenMP thread; callers from Python threads must not clash, and
    the BLAS's own thread count is back to what it was afterwards (MLX's matmuls use it)."""
    import ctypes

    from sd.runtime import blas

    openblas = ctypes.CDLL(blas.load_fast_blas())
    before = openblas.openblas_get_num_threads()
    rng = np.random.default_rng(7)
    q, k, v = (mx.array(rng.standard_normal((1, 300, 2 * 40)).astype(np.float32)) for _ in range(3))
    ref = np.array(_sdpa(q, k, v, 2, 0.15))
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: np.array(cpu_kernels.attention(q, k, v, 2, 0.15, block=64)), range(6)))
    for out in outs:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert openblas.openblas_get_num_threads() == before


# ------------------------------------------------------------------------------------------ FastOps with them
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", seed=11),
                           dtype="float32")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernels FastOps calls (the conv kernel also on the tiny model's small images)."""
    monkeypatch.setattr(cpu_kernels, "CONV_MIN_PIXELS", 1)
    monkeypatch.setattr(cpu_kernels, "CONV_MIN_CHANNELS", 1)
    calls = {"attention": 0, "geglu": 0, "group_norm": 0, "conv3x3": 0}
    for name in calls:
        original = getattr(cpu_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, counted)
    return calls


def _unet_args(model):
    rng = np.random.default_rng(3)
    return (mx.array(rng.standard_normal((2, 16, 24, 4)).astype(np.float32)), mx.array([10.0, 800.0]),
            mx.array(rng.standard_normal((2, 77, model.unet_config.context_dim)).astype(np.float32)))


def test_cpu_defaults_use_the_kernels_uncompiled():
    opts = options_here("unet")
    assert opts.cpu_kernels and not opts.compile
    assert options_here("vae").cpu_kernels


# fused_qkv=True is the CPU default: the quick tier runs that one
@pytest.mark.slow
@pytest.mark.parametrize("fused_qkv", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fast_unet_with_kernels_matches_plain(model, kernel_calls, fused_qkv):
    args = _unet_args(model)
    opts = FastOptions(cpu_kernels=True, fused_qkv=fused_qkv)   # compile=True is ignored with the kernels
    assert rel_err(FastUNet(model.unet, opts)(*args), model.unet(*args)) <= 2e-5
    assert all(kernel_calls.values()), kernel_calls


@pytest.mark.slow
def test_fast_vae_with_kernels_matches_plain(model, kernel_calls):
    latent = mx.array(np.random.default_rng(4).standard_normal((1, 12, 16, 4)).astype(np.float32))
    fast = FastVAE(model.vae, options_here("vae"))
    assert rel_err(fast.decode(latent), model.vae.decode(latent)) <= 2e-5
    assert kernel_calls["attention"] and kernel_calls["group_norm"] and kernel_calls["conv3x3"]


@pytest.mark.slow
def test_half_precision_keeps_mlx_ops(model, kernel_calls, tmp_path):
    unet16 = load_checkpoint(make_checkpoint(tmp_path / "tiny.safetensors", seed=11), dtype="float16").unet
    args = _unet_args(model)
    out = FastUNet(unet16, options_here("unet"))(*args)
    assert rel_err(out, model.unet(*args)) <= 1e-2
    assert not any(kernel_calls.values())


# ---------------------------------------------------------------------------------------------- fallback
@pytest.mark.slow
def test_disabled_by_environment(model, kernel_calls, monkeypatch):
    assert "threads" in cpu_kernels.describe()
    monkeypatch.setenv("SDGRAPH_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    assert cpu_kernels.describe() == "off (SDGRAPH_CPU_KERNELS=0)"
    assert not options_here("unet").cpu_kernels
    args = _unet_args(model)
    # asked for explicitly, the kernels still step aside: MLX's ops compute the same
    assert rel_err(FastUNet(model.unet, FastOptions(cpu_kernels=True))(*args), model.unet(*args)) <= 2e-5
    assert not any(kernel_calls.values())


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SDGRAPH_CPU_KERNELS"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ,
                          timeout=120)


@pytest.mark.slow
def test_broken_compiler_falls_back_with_one_warning(tmp_path):
    code = ("from sd import runtime; runtime.setup()\nimport mlx.core as mx\n"
            "from sd.accel import cpu_kernels\n"
            "from sd.accel.ops import options_here\n"
            "print(cpu_kernels.available(), cpu_kernels.available(), options_here('unet').cpu_kernels)\n")
    proc = _python(code, CC="/bin/false", SDGRAPH_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"]
    warnings = [ln for ln in proc.stderr.splitlines() if "CPU kernels unavailable" in ln]
    assert len(warnings) == 1 and "/bin/false" in warnings[0], proc.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.slow
def test_ranks_building_at_once_share_one_library(tmp_path):
    """Distributed ranks start together: each compiles to a private file and renames it into place."""
    code = ("from sd import runtime; runtime.setup()\nfrom sd.accel import cpu_kernels\n"
            "print(cpu_kernels.available(), cpu_kernels.build())\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ | {"SDGRAPH_CACHE_DIR": str(tmp_path)})
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {out.split()[0] for out, _ in outs} == {"True"}
    assert len({out.split()[1] for out, _ in outs}) == 1
    library = os.path.basename(outs[0][0].split()[1])  # one library, and the hash record of what was built
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [library, library + ".sha256"]
