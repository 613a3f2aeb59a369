"""sd/accel/cuda_kernels.py: the CUDA kernels against MLX's own ops (run where MLX's CUDA backend is: the lent
GPU, `python3 -m pytest tests/test_cuda_kernels.py`), and the switch that keeps them off everywhere else."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sd.accel import cuda_kernels
from sd.accel.ops import FastOps, FastOptions, default_options, options_here

on_cuda = pytest.mark.skipif(not cuda_kernels.available(), reason="needs MLX's CUDA backend (the lent GPU)")


def test_off_without_cuda_and_by_switch(monkeypatch):
    if not mx.cuda.is_available():
        assert not cuda_kernels.available()
        assert not options_here("unet").cuda_kernels and not options_here("vae").cuda_kernels
    monkeypatch.setenv("SDGRAPH_CUDA_KERNELS", "0")
    assert not cuda_kernels.available()
    assert "SDGRAPH_CUDA_KERNELS=0" in cuda_kernels.describe()
    assert not options_here("unet").cuda_kernels


def test_layout_requirements():
    assert cuda_kernels.supported(mx.zeros((1, 4, 4, 320), mx.float16))
    assert not cuda_kernels.supported(mx.zeros((1, 4, 4, 4), mx.float16))    # the latent: 8-byte rows
    assert not cuda_kernels.supported(mx.zeros((1, 4, 4, 3), mx.float32))    # odd channel count
    for batch, pixels in ((1, 64), (2, 4096), (1, 512 * 512), (2, 7)):
        chunk = cuda_kernels._chunk_for(batch, pixels)
        assert 1 <= chunk <= pixels and -(-pixels // chunk) * chunk >= pixels


def _rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / np.abs(b).max())


@on_cuda
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.float16, 1e-2), (mx.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(2, 16, 16, 320), (1, 24, 20, 128), (2, 3, 5, 64)])
def test_group_norm_and_fused_conv_match_mlx(dtype, tol, shape):
    rng = np.random.default_rng(0)
    x = mx.array((rng.standard_normal(shape) * 3 + 5).astype(np.float32)).astype(dtype)  # large mean
    gn = nn.GroupNorm(32, shape[-1], pytorch_compatible=True)
    gn.weight = mx.array(rng.standard_normal(shape[-1]).astype(np.float32)).astype(dtype)
    gn.bias = mx.array(rng.standard_normal(shape[-1]).astype(np.float32)).astype(dtype)
    ref_gn = gn(x.astype(mx.float32))
    assert _rel(FastOps(FastOptions(cuda_kernels=True)).group_norm(gn, x), ref_gn) < tol
    # a per-(batch, channel) offset folded into the statistics == GroupNorm of x + offset
    e = mx.array(rng.standard_normal((shape[0], shape[-1])).astype(np.float32) * 4).astype(dtype)
    scale, shift = cuda_kernels.group_norm_affine(gn, x, mx.contiguous(e.T))  # the offset is channel-major
    shifted = (x.astype(mx.float32) * scale[:, None, None, :] + shift[:, None, None, :])
    assert _rel(shifted, gn((x + e[:, None, None, :]).astype(mx.float32))) < tol
    conv = nn.Conv2d(shape[-1], 48, 3, padding=1)
    conv.weight, conv.bias = conv.weight.astype(dtype), conv.bias.astype(dtype)
    scale, shift = cuda_kernels.group_norm_affine(gn, x)
    fused = cuda_kernels.conv3x3(conv, x, scale, shift, silu=True)
    wf = conv.weight.astype(mx.float32)
    ref = mx.conv2d(nn.silu(ref_gn), wf, padding=1) + conv.bias.astype(mx.float32)
    conv_tol = max(2 * tol, 1e-4)  # fp32 GEMMs and convs run as TF32 on MLX's CUDA backend
    assert _rel(fused, ref) < conv_tol
    ref = mx.conv2d(x.astype(mx.float32), wf, padding=1) + conv.bias.astype(mx.float32)
    assert _rel(cuda_kernels.conv3x3(conv, x), ref) < conv_tol


@on_cuda
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-4), (mx.float16, 1e-2), (mx.bfloat16, 3e-2)])
@pytest.mark.parametrize("lq,lk", [(256, 256), (64, 77), (50, 13)])
def test_attention_kernel_reads_strided_views_and_matches_mlx(dtype, tol, lq, lk):
    """160-wide heads (SD's 1280-channel levels), q/k/v as slices of wider projection buffers, the way the
    fused q|k|v and the shared context k|v hand them over."""
    rng = np.random.default_rng(2)
    heads, d = 8, 160
    c = heads * d
    qkv = mx.array(rng.standard_normal((2, lq, 3 * c)).astype(np.float32)).astype(dtype)
    kv = mx.array(rng.standard_normal((2, lk, 5 * c)).astype(np.float32)).astype(dtype)
    q = mx.split(qkv, 3, axis=-1)[1]                  # the middle third: an offset, strided view
    k, v = kv[..., 2 * c:3 * c], kv[..., 4 * c:]
    assert cuda_kernels.attention_supported(q, k, heads)
    out = cuda_kernels.attention(q, k, v, heads, d ** -0.5)

    def split(t):
        return t.astype(mx.float32).reshape(2, -1, heads, d).transpose(0, 2, 1, 3)

    with mx.stream(mx.cpu):  # exact fp32 (the GPU's fallback for these heads runs its matmuls as TF32)
        ref = mx.fast.scaled_dot_product_attention(split(q), split(k), split(v), scale=d ** -0.5)
        ref = ref.transpose(0, 2, 1, 3).reshape(2, lq, c)
        mx.eval(ref)
    assert out.shape == (2, lq, c) and out.dtype == dtype
    assert _rel(out, ref) < tol


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd.loading.checkpoint import load_checkpoint
    from sd.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("cuda") / "tiny.safetensors", seed=11)
    return {dtype: load_checkpoint(path, dtype=dtype) for dtype in ("float32", "float16", "bfloat16")}


@on_cuda
@pytest.mark.parametrize("levers", [{}, {"shared_projections": True}],
                         ids=["kernels", "kernels + shared projections"])
def test_fast_unet_and_vae_with_kernels_match_plain_modules(tiny, levers):
    from sd.accel.compiled import FastUNet, FastVAE

    rng = np.random.default_rng(3)
    dim = tiny["float32"].unet_config.context_dim
    args = (mx.array(rng.standard_normal((2, 16, 24, 4)).astype(np.float32)), mx.array([10.0, 800.0]),
            mx.array(rng.standard_normal((2, 77, dim)).astype(np.float32)))
    gpu = default_options("unet", gpu=True, cuda=True).with_(**{"shared_projections": False, **levers})
    ref = tiny["float32"].unet(*args)
    # MLX's CUDA matmuls and convs run fp32 as TF32 (10-bit mantissa): the kernels may differ from the plain
    # modules by what the same path without them differs (~1e-3), not more
    tf32 = _rel(FastUNet(tiny["float32"].unet, gpu.with_(cuda_kernels=False))(*args), ref)
    assert _rel(FastUNet(tiny["float32"].unet, gpu)(*args), ref) < max(2e-5, 2 * tf32)
    assert _rel(FastUNet(tiny["float16"].unet, gpu)(*args), ref) < 1e-2
    z = mx.array(rng.standard_normal((1, 12, 16, 4)).astype(np.float32))
    ref = tiny["float32"].vae.decode(z)
    tf32 = _rel(FastVAE(tiny["float32"].vae, default_options("vae", gpu=True)).decode(z), ref)
    for dtype, tol in (("float32", max(2e-5, 2 * tf32)), ("bfloat16", 3e-2)):
        for opts in (default_options("vae", gpu=True, cuda=True), gpu):
            assert _rel(FastVAE(tiny[dtype].vae, opts).decode(z), ref) < tol, (dtype, opts)


# ---- compiled once per machine: variants, the kernel folder, NVRTC (no GPU needed) -------------------------

def _fake_launch(record):
    def launch(kernel, params, body, constants, inputs, scalars, grid, threadgroup, output_shapes,
               output_dtypes):
        record.add((kernel, tuple(constants.items())))
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
    return launch


@pytest.mark.slow
def test_kernel_variants_do_not_grow_with_image_size_batch_or_values(tiny, monkeypatch):
    """Shapes and values are kernel arguments: a 16x16 and a 24x32 latent, batch 1 and 2, other timesteps and
    prompts use the same compiled variants (before, every resolution needed its own: ~40 s per process)."""
    seen = {}
    for key, (b, h, w, t, seed) in {"small": (1, 16, 16, 10.0, 0), "large": (2, 24, 32, 900.0, 1)}.items():
        record = set()
        monkeypatch.setattr(cuda_kernels, "_launch", _fake_launch(record))
        rng = np.random.default_rng(seed)
        unet = tiny["float16"].unet
        x = mx.array(rng.standard_normal((b, h, w, 4)).astype(np.float32))
        c = mx.array(rng.standard_normal((b, 77, unet.config.context_dim)).astype(np.float32))
        opts = default_options("unet", gpu=True, cuda=True).with_(cpu_kernels=False)
        mx.eval(unet(x, mx.full((b,), t), c, ops=FastOps(opts)))
        mx.eval(tiny["float16"].vae.decode(x.astype(mx.float16), ops=FastOps(opts)))
        seen[key] = record
    assert seen["small"] == seen["large"] and 3 <= len(seen["small"]) <= 12, seen


def test_a_variant_is_compiled_once_per_machine_and_only_a_verified_binary_is_used(tmp_path, monkeypatch,
                                                                                   capsys):
    from sd import runtime
    from sd.accel import nvrtc

    compiles = []
    monkeypatch.setattr(nvrtc, "compile_cubin", lambda source, arch, name: compiles.append(name) or b"CUBIN")
    monkeypatch.setattr(cuda_kernels, "_toolchain", lambda: ("sm_90", "13000", "13.0"))
    monkeypatch.setattr(runtime, "kernel_cache_dir", lambda: tmp_path / "kernels")
    from sd.accel import gpu_cache

    monkeypatch.setattr(gpu_cache, "_state", {"prepared": False, "announced": False})
    args = ("sdgraph_channel_sums", cuda_kernels._SUMS_PARAMS, cuda_kernels._SUMS_BODY,
            (("T", mx.float16),))

    def new_process():
        cuda_kernels._binary.cache_clear()
        return cuda_kernels._binary(*args)

    try:
        name, cubin = new_process()
        assert cubin == b"CUBIN" and compiles == [f"{name}.cu"]
        assert "compiling GPU kernels for this GPU (first run only" in capsys.readouterr().err
        [stored] = (tmp_path / "kernels").glob("cuda-*.cubin")
        assert (tmp_path / "kernels").stat().st_mode & 0o777 == 0o700
        assert new_process() == (name, b"CUBIN") and len(compiles) == 1  # a later process: read, not built
        assert capsys.readouterr().err == ""
        stored.write_bytes(b"PLANTED")  # swapped after it was recorded: never handed to the GPU
        assert new_process() == (name, b"CUBIN") and len(compiles) == 2
    finally:
        cuda_kernels._binary.cache_clear()


def _nvrtc_ready() -> bool:
    from sd.accel import nvrtc

    try:
        nvrtc.library()
    except nvrtc.NvrtcError:
        return False
    return bool(nvrtc.include_folders())


@pytest.mark.slow
@pytest.mark.skipif(not _nvrtc_ready(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel) and CUDA headers")
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_every_kernel_variant_compiles_with_nvrtc(dtype):
    """The sources as the GPU gets them, compiled for the H200's sm_90 without a GPU."""
    from sd.accel import nvrtc

    ck = cuda_kernels
    cases = [("sdgraph_channel_sums", ck._SUMS_PARAMS, ck._SUMS_BODY, {"T": dtype}),
             ("sdgraph_attention", ck._ATTN_PARAMS, ck._ATTN_BODY, {"T": dtype, "D": 160})]
    cases += [("sdgraph_gn_affine", ck._AFFINE_PARAMS, ck._AFFINE_BODY,
               {"WT": dtype, "BT": dtype, "OT": ot, "OFFSET": offset})
              for ot, offset in ((dtype, True), (mx.float32, False))]
    cases += [("sdgraph_im2col3x3", ck._IM2COL_PARAMS, ck._IM2COL_BODY,
               {"T": dtype, "VEC": 16 // dtype.size, "AFFINE": a, "SILU": s})
              for a, s in ((False, False), (True, True), (True, False))]
    for kernel, params, body, constants in cases:
        name = ck.variant_name(kernel, constants)
        cubin = nvrtc.compile_cubin(ck.kernel_source(name, params, constants, body), "sm_90", name=name)
        assert cubin[:4] == b"\x7fELF" and name.encode() in cubin
