"""Half precision and the optimised paths (sd/accel/fast.py) against the plain fp32 modules, on tiny models (CPU).

- fp16 (the GPU default for UNet and CLIP; also the VAE) stays within 1e-2 relative (max abs error / max abs
  reference) of fp32; bf16 (the GPU default for the VAE) within 3e-2;
- every lever of sd.accel.fast (mx.compile, im2col convs, column-sum / two-stage GroupNorm, fused QKV, manual and
  chunked attention) computes what the plain modules compute, to fp32 rounding.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sd.accel.fast import FastOptions, FastUNet, FastVAEDecoder, FastVAEEncoder, default_options
from sd.loading.checkpoint import load_checkpoint
from sd.models.clip import encode_tokens
from sd.synthetic import make_checkpoint

HALF_TOLERANCE = 1e-2
FAST_TOLERANCE = 2e-5


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


def test_unet_fp16_close_to_fp32(models, unet_args):
    ref = models["float32"].unet(*unet_args)
    assert rel_err(models["float16"].unet(*unet_args), ref) <= HALF_TOLERANCE
    # the optimised path in fp16 against the plain fp32 modules
    fast = FastUNet(models["float16"].unet, default_options("unet"))
    assert rel_err(fast(*unet_args), ref) <= HALF_TOLERANCE
    gpu_unet = FastOptions(conv="im2col", groupnorm="colsum", fused_qkv=True)
    assert rel_err(FastUNet(models["float16"].unet, gpu_unet)(*unet_args), ref) <= HALF_TOLERANCE


# bf16 keeps 8 mantissa bits (fp16: 11): each rounding costs up to 4e-3, so its bound is wider.
@pytest.mark.parametrize("dtype,tolerance", [("float16", HALF_TOLERANCE), ("bfloat16", 3e-2)])
def test_vae_half_close_to_fp32(models, latent, dtype, tolerance):
    """Activations in half precision too: the input is cast to the weights' dtype as nodes/latents.py does
    (an fp32 input would promote every activation back to fp32)."""
    half = getattr(mx, dtype)
    ref = models["float32"].vae.decode(latent)
    assert rel_err(models[dtype].vae.decode(latent.astype(half)), ref) <= tolerance
    fast = FastVAEDecoder(models[dtype].vae, FastOptions(groupnorm="colsum"))
    assert rel_err(fast(latent), ref) <= tolerance
    image = mx.array(np.random.default_rng(5).uniform(-1, 1, (1, 32, 40, 3)).astype(np.float32))
    ref_latent = models["float32"].vae.encode(image)
    assert rel_err(models[dtype].vae.encode(image.astype(half)), ref_latent) <= tolerance


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


UNET_LEVERS = {
    "no compile": FastOptions(compile=False),
    "compile": FastOptions(),
    "im2col": FastOptions(conv="im2col"),
    "colsum GN": FastOptions(groupnorm="colsum"),
    "two-stage GN": FastOptions(groupnorm="two_stage"),
    "fused QKV": FastOptions(fused_qkv=True),
    "manual attention": FastOptions(attention="manual"),
    "auto attention": FastOptions(attention="auto"),
    "chunked attention": FastOptions(attn_chunk=64),
    "GPU default": FastOptions(conv="im2col", groupnorm="colsum", fused_qkv=True),
    "shared projections": FastOptions(fused_qkv=True, shared_projections=True),
    "shared projections, uncompiled": FastOptions(compile=False, fused_qkv=True, shared_projections=True),
    "attention over 2 CPU streams": FastOptions(streams=2),
    "batch over 2 CPU streams": FastOptions(batch_streams=2, streams=2),
}


@pytest.mark.parametrize("name", list(UNET_LEVERS))
def test_fast_unet_matches_plain(models, unet_args, name):
    unet = models["float32"].unet
    assert rel_err(FastUNet(unet, UNET_LEVERS[name])(*unet_args), unet(*unet_args)) <= FAST_TOLERANCE


def test_fast_unet_odd_latent_sides(models):
    """Latent sides that do not halve evenly (the upsampler crops to the skip) work on the fast path too."""
    unet = models["float32"].unet
    rng = np.random.default_rng(8)
    args = (mx.array(rng.standard_normal((1, 13, 11, 4)).astype(np.float32)), mx.array([500.0]),
            mx.array(rng.standard_normal((1, 77, models["float32"].unet_config.context_dim))
                     .astype(np.float32)))
    assert rel_err(FastUNet(unet, UNET_LEVERS["GPU default"])(*args), unet(*args)) <= FAST_TOLERANCE


@pytest.mark.parametrize("opts", [FastOptions(compile=False), FastOptions(), FastOptions(groupnorm="colsum"),
                                  FastOptions(conv="im2col", groupnorm="two_stage", attn_chunk=32),
                                  FastOptions(streams=3)],
                         ids=["no compile", "compile", "colsum GN", "im2col+two-stage+chunked", "3 streams"])
def test_fast_vae_decoder_matches_plain(models, latent, opts):
    vae = models["float32"].vae
    assert rel_err(FastVAEDecoder(vae, opts)(latent), vae.decode(latent)) <= FAST_TOLERANCE


@pytest.mark.parametrize("opts", [FastOptions(compile=False), FastOptions(groupnorm="colsum"),
                                  FastOptions(conv="im2col", groupnorm="two_stage", attn_chunk=32),
                                  default_options("vae")],
                         ids=["plain ops", "compile + colsum GN", "im2col + two-stage GN", "default"])
@pytest.mark.parametrize("size", [(1, 32, 48), (2, 40, 24)])
def test_fast_vae_encoder_matches_plain(models, opts, size):
    vae = models["float32"].vae
    b, h, w = size
    image = mx.array(np.random.default_rng(5).uniform(-1, 1, (b, h, w, 3)).astype(np.float32))
    assert rel_err(FastVAEEncoder(vae, opts)(image), vae.encode(image)) <= FAST_TOLERANCE


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


@pytest.mark.parametrize("compile_", [True, False])
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
