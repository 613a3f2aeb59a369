"""Half precision, and the accelerated backend (sd/accel) against the plain one, on tiny models (CPU).

- fp16 (the GPU default for UNet and CLIP) stays within 1e-2 relative (max abs error / max abs reference) of
  fp32; bf16 (the GPU default for the VAE) is held to diffusers' own bf16 VAE on the same weights and inputs
  (a same-precision reference: bf16's error depends on the input and on each backend's rounding order, so
  no single number fits every BLAS and CPU);
- every lever of FastOptions, alone and in each device's real default set, computes what the plain ops
  compute, to fp32 rounding.
"""

from __future__ import annotations

from dataclasses import fields

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import diffusers_vae, read_state

from sd.accel.compiled import FastUNet, FastVAE
from sd.accel.ops import FastOptions, default_options
from sd.loading.checkpoint import PREFIXES, load_checkpoint
from sd.models.clip import encode_tokens
from sd.synthetic import make_checkpoint

HALF_TOLERANCE = 1e-2
FAST_TOLERANCE = 2e-5
# our bf16 VAE against fp32, over several inputs, may be this many times diffusers' bf16 VAE against fp32
# (measured on a 2-core x86 CPU: 0.9-2.1x per input, 1.4x worst over worst)
BF16_VS_REFERENCE = 2.5


def rel_err(ours, ref) -> float:
    ours, ref = np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32))
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp16") / "tiny.safetensors", seed=11)


@pytest.fixture(scope="module")
def models(path):
    return {dtype: load_checkpoint(path, dtype=dtype) for dtype in ("float32", "float16", "bfloat16")}


@pytest.fixture(scope="module")
def unet_args(models):
    rng = np.random.default_rng(3)
    dim = models["float32"].unet_config.context_dim
    return (mx.array(rng.standard_normal((2, 16, 24, 4)).astype(np.float32)), mx.array([10.0, 800.0]),
            mx.array(rng.standard_normal((2, 77, dim)).astype(np.float32)))


@pytest.fixture(scope="module")
def latent():
    return mx.array(np.random.default_rng(4).standard_normal((1, 12, 16, 4)).astype(np.float32))


GPU_UNET = default_options("unet", gpu=True)        # what a GPU without sdgraph's CUDA kernels runs (Metal)
GPU_VAE = default_options("vae", gpu=True)
CPU_PLAIN_UNET = default_options("unet", gpu=False)  # a CPU where the C kernels do not build
CPU_PLAIN_VAE = default_options("vae", gpu=False)


@pytest.mark.slow
def test_unet_fp16_close_to_fp32(models, unet_args):
    ref = models["float32"].unet(*unet_args)
    assert rel_err(models["float16"].unet(*unet_args), ref) <= HALF_TOLERANCE
    for opts in (GPU_UNET, CPU_PLAIN_UNET):  # the accelerated backend in fp16 against the plain fp32 one
        assert rel_err(FastUNet(models["float16"].unet, opts)(*unet_args), ref) <= HALF_TOLERANCE


@pytest.mark.slow
def test_vae_fp16_close_to_fp32(models, latent):
    ref = models["float32"].vae.decode(latent)
    assert rel_err(models["float16"].vae.decode(latent), ref) <= HALF_TOLERANCE
    assert rel_err(FastVAE(models["float16"].vae, GPU_VAE).decode(latent), ref) <= HALF_TOLERANCE
    image = mx.array(np.random.default_rng(5).uniform(-1, 1, (1, 32, 40, 3)).astype(np.float32))
    ref_latent = models["float32"].vae.encode(image)
    assert rel_err(models["float16"].vae.encode(image), ref_latent) <= HALF_TOLERANCE


@pytest.mark.slow
def test_vae_bf16_as_close_to_fp32_as_diffusers_bf16(models, path):
    """Decode and encode, plain and accelerated, over several inputs: our worst bf16 error is held to
    diffusers' worst bf16 error on the same weights (torch's CPU kernels; the reference of every VAE test)."""
    prefix = PREFIXES["vae"]
    state = {k[len(prefix):]: v for k, v in read_state(path).items() if k.startswith(prefix)}
    ref32 = diffusers_vae(models["float32"].vae.config, state)
    ref16 = diffusers_vae(models["float32"].vae.config, state).to(torch.bfloat16)
    ours32, ours16 = models["float32"].vae, models["bfloat16"].vae
    fast16 = FastVAE(ours16, GPU_VAE)
    worst = {"ours": 0.0, "fast": 0.0, "diffusers": 0.0}
    for seed in range(4):
        rng = np.random.default_rng(seed)
        image = rng.uniform(-1, 1, (1, 32, 40, 3)).astype(np.float32)
        z = rng.standard_normal((1, 12, 16, 4)).astype(np.float32)
        t_image, t_z = torch.from_numpy(image).permute(0, 3, 1, 2), torch.from_numpy(z).permute(0, 3, 1, 2)
        with torch.no_grad():
            pairs = {
                "diffusers": [(ref16.encode(t_image.bfloat16()).latent_dist.mode(),
                               ref32.encode(t_image).latent_dist.mode()),
                              (ref16.decode(t_z.bfloat16()).sample, ref32.decode(t_z).sample)],
            }
        pairs["diffusers"] = [(mx.array(a.float().numpy()), mx.array(b.numpy()))
                              for a, b in pairs["diffusers"]]
        for name, vae in (("ours", ours16), ("fast", fast16)):
            pairs[name] = [(vae.encode(mx.array(image)), ours32.encode(mx.array(image))),
                           (vae.decode(mx.array(z)), ours32.decode(mx.array(z)))]
        for name, results in pairs.items():
            worst[name] = max(worst[name], *(rel_err(a, b) for a, b in results))
    assert worst["ours"] <= BF16_VS_REFERENCE * worst["diffusers"], worst
    assert worst["fast"] <= BF16_VS_REFERENCE * worst["diffusers"], worst


def test_clip_fp16_close_to_fp32(models):
    vocab = models["float32"].clip_config.vocab_size
    rng = np.random.default_rng(6)
    tokens = np.full((2, 77), vocab - 1, dtype=np.int32)
    tokens[:, 0] = vocab - 2
    tokens[0, 1:9] = rng.integers(0, vocab - 2, 8)
    tokens[1, 1:30] = rng.integers(0, vocab - 2, 29)
    tokens = mx.array(tokens)
    for skip in (-1, -2):
        ref, ref_pooled = encode_tokens(models["float32"].clip, tokens, skip)
        half, half_pooled = encode_tokens(models["float16"].clip, tokens, skip)
        assert rel_err(half, ref) <= HALF_TOLERANCE
        assert rel_err(half_pooled, ref_pooled) <= HALF_TOLERANCE


def _single_levers() -> dict[str, FastOptions]:
    """Each lever of FastOptions switched on alone (from the all-off options), plus the real defaults."""
    base = FastOptions(compile=False)
    on = {"compile": True, "conv": "im2col", "groupnorm": "colsum", "fused_qkv": True, "streams": 2}
    levers = {name: base.with_(**{name: value}) for name, value in on.items()}
    levers["shared_projections"] = base.with_(fused_qkv=True, shared_projections=True)
    levers["shared_projections, compiled"] = levers["shared_projections"].with_(compile=True)
    # the device-only levers are tested where they run: test_cuda_kernels.py, test_cpu_kernels.py
    covered = set(on) | {"shared_projections", "cuda_kernels", "cpu_kernels"}
    assert covered == {f.name for f in fields(FastOptions)}, "a new lever needs a test here"
    return levers


UNET_LEVERS = _single_levers() | {"GPU default": GPU_UNET, "CPU default without C kernels": CPU_PLAIN_UNET}
VAE_LEVERS = _single_levers() | {"GPU default": GPU_VAE, "CPU default without C kernels": CPU_PLAIN_VAE}


def _tiered(levers: dict) -> list:
    """The real default sets in the quick tier, each single lever in the slow one."""
    return [pytest.param(name, marks=() if "default" in name else pytest.mark.slow) for name in levers]


@pytest.mark.slow
@pytest.mark.parametrize("name", _tiered(UNET_LEVERS))
def test_fast_unet_matches_plain(models, unet_args, name):
    unet = models["float32"].unet
    assert rel_err(FastUNet(unet, UNET_LEVERS[name])(*unet_args), unet(*unet_args)) <= FAST_TOLERANCE


@pytest.mark.slow
def test_fast_unet_odd_latent_sides(models):
    """Latent sides that do not halve evenly (the upsampler crops to the skip) work on the fast path too."""
    unet = models["float32"].unet
    rng = np.random.default_rng(8)
    args = (mx.array(rng.standard_normal((1, 13, 11, 4)).astype(np.float32)), mx.array([500.0]),
            mx.array(rng.standard_normal((1, 77, models["float32"].unet_config.context_dim))
                     .astype(np.float32)))
    assert rel_err(FastUNet(unet, GPU_UNET)(*args), unet(*args)) <= FAST_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", _tiered(VAE_LEVERS))
def test_fast_vae_decoder_matches_plain(models, latent, name):
    vae = models["float32"].vae
    assert rel_err(FastVAE(vae, VAE_LEVERS[name]).decode(latent), vae.decode(latent)) <= FAST_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", _tiered(VAE_LEVERS))
@pytest.mark.parametrize("size", [(1, 32, 48), (2, 40, 24)])
def test_fast_vae_encoder_matches_plain(models, name, size):
    vae = models["float32"].vae
    b, h, w = size
    image = mx.array(np.random.default_rng(5).uniform(-1, 1, (b, h, w, 3)).astype(np.float32))
    assert rel_err(FastVAE(vae, VAE_LEVERS[name]).encode(image), vae.encode(image)) <= FAST_TOLERANCE


@pytest.mark.slow
def test_fast_paths_follow_weight_changes(path, unet_args):
    """The compiled graph takes the parameters as inputs: patching weights (LoRA) changes its output."""
    unet = load_checkpoint(path, dtype="float32", parts=("unet",)).unet
    fast = FastUNet(unet, FastOptions())
    before = np.array(fast(*unet_args))
    conv = unet.out[2]
    conv.weight = conv.weight * 2.0
    conv.bias = conv.bias * 2.0
    after = np.array(fast(*unet_args))
    assert np.allclose(after, 2 * before, rtol=1e-4, atol=1e-5)
    assert rel_err(mx.array(after), unet(*unet_args)) <= FAST_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("compile_", [pytest.param(True, marks=pytest.mark.slow), False])
def test_fused_projections_follow_replaced_weights(path, unet_args, compile_):
    """FastUNet keeps q|k|v concatenated across calls; replacing a weight array (what a LoRA patch or a reload
    does) must reach the next call, compiled or not."""
    unet = load_checkpoint(path, dtype="float32").unet
    fast = FastUNet(unet, FastOptions(compile=compile_, fused_qkv=True, shared_projections=True))
    assert rel_err(fast(*unet_args), unet(*unet_args)) <= FAST_TOLERANCE
    for m, _ in fast.fused.modules:
        m.to_k.weight = m.to_k.weight * 1.5
        m.to_v.weight = -m.to_v.weight
    for rb in fast.fused.res_blocks:  # the time-embedding projections are stacked too
        rb.emb_layers[1].weight = rb.emb_layers[1].weight * 3.0
        rb.emb_layers[1].bias = rb.emb_layers[1].bias - 1.0
    assert fast.fused.res_blocks
    ref = unet(*unet_args)
    assert rel_err(fast(*unet_args), ref) <= FAST_TOLERANCE
