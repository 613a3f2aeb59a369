"""The synthetic checkpoint generator writes the real SD1.5 layout; its writers make files torch reads."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd15_keys import sd15_shapes

from sd.synthetic import (
    PREFIXES,
    TensorSpec,
    _PickleWriter,
    make_checkpoint,
    to_bfloat16_bits,
    write_torch_zip,
)
from sd.synthetic.unet import SD15_UNET, TINY_UNET, unet_shapes


def reference_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """{key without prefix: shape} for one component, from the recorded SD1.5 key list."""
    return sd15_shapes(prefix)


class _ZeroRNG:
    """Stands in for np.random.Generator so full-size VAE/CLIP layouts come out without drawing 200M
    random numbers: the layout test needs names and shapes only."""

    def standard_normal(self, shape=None, dtype=np.float64):
        return np.zeros((), dtype=dtype) if shape is None else np.broadcast_to(np.zeros((), dtype), shape)


def test_full_unet_layout_equals_sd15():
    ours, reference = unet_shapes(SD15_UNET), reference_shapes(PREFIXES["unet"])
    assert len(reference) == 686
    assert sorted(set(ours) ^ set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


def test_tiny_unet_keeps_sd15_structure():
    """Same key names as SD1.5 (only widths differ), so tiny tests exercise the real block layout."""
    assert set(unet_shapes(TINY_UNET)) == set(unet_shapes(SD15_UNET))


def test_full_vae_layout_equals_sd15():
    from sd.synthetic.vae import SD15_VAE, random_vae_weights

    ours = {k: v.shape for k, v in random_vae_weights(SD15_VAE, _ZeroRNG()).items()}
    reference = reference_shapes(PREFIXES["vae"])
    assert sorted(set(ours) ^ set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


@pytest.mark.slow
def test_full_clip_layout_equals_sd15():
    from sd.synthetic.clip import SD15_CLIP, random_clip_weights

    ours = {k: v.shape for k, v in random_clip_weights(SD15_CLIP, _ZeroRNG()).items()}
    ours["text_model.embeddings.position_ids"] = (1, SD15_CLIP.max_positions)  # added by make_checkpoint
    reference = reference_shapes(PREFIXES["clip"])
    assert sorted(set(ours) ^ set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float16", marks=pytest.mark.slow),
                                   pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_both_formats_hold_the_same_weights_and_torch_reads_them(tmp_path, dtype):
    ckpt = make_checkpoint(tmp_path / "tiny.ckpt", dtype=dtype, seed=5)
    safetensors = make_checkpoint(tmp_path / "tiny.safetensors", dtype=dtype, seed=5)
    from_ckpt = torch.load(ckpt, weights_only=True)  # the restricted unpickler accepts our pickle
    from_safetensors = load_file(safetensors)
    assert list(from_ckpt) == list(from_safetensors)
    assert set(from_ckpt) >= {PREFIXES[p] + "input_blocks.0.0.weight" for p in ("unet",)}
    expected = getattr(torch, dtype)
    for key, tensor in from_ckpt.items():
        assert torch.equal(tensor, from_safetensors[key]), key
        assert tensor.dtype == (torch.int64 if key.endswith("position_ids") else expected), key


@pytest.mark.slow
def test_parts_and_seed_are_independent(tmp_path):
    """A UNet-only file holds the same UNet as a complete one; another seed gives other weights."""
    full = load_file(make_checkpoint(tmp_path / "full.safetensors", seed=9))
    unet_only = load_file(make_checkpoint(tmp_path / "unet.safetensors", seed=9, parts=("unet",)))
    other = load_file(make_checkpoint(tmp_path / "other.safetensors", seed=10, parts=("unet",)))
    assert all(k.startswith(PREFIXES["unet"]) for k in unet_only)
    key = PREFIXES["unet"] + "input_blocks.1.1.proj_in.weight"
    assert torch.equal(full[key], unet_only[key])
    assert not torch.equal(other[key], unet_only[key])


def test_bfloat16_rounding_matches_torch():
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    values[:4] = [1.00390625, 1.01171875, -3.0e38, 1e-40]  # exact ties (to even) and extremes
    ours = to_bfloat16_bits(values)
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("n", [0, 255, 256, 65_535, 2**31 - 1, 2**31, 2**40, -1, -(2**31) - 5])
def test_pickle_integers_round_trip(n):
    """numel/strides of big tensors pass 2**31 and need LONG1; plain pickle (no globals) must read them."""
    writer = _PickleWriter()
    writer.integer(n)
    assert pickle.loads(bytes(writer.out) + b".") == n


def test_scalars_and_rows_in_the_pickle(tmp_path):
    """0-d tensors give empty size/stride tuples; torch must agree with what we wrote."""
    specs = [TensorSpec("scalar", (), lambda: np.array(2.5, dtype=np.float32)),
             TensorSpec("row", (1, 300), lambda: np.arange(300, dtype=np.float32)[None])]
    write_torch_zip(tmp_path / "small.ckpt", specs, "float32")
    loaded = torch.load(tmp_path / "small.ckpt", weights_only=True)
    assert loaded["scalar"].shape == () and float(loaded["scalar"]) == 2.5
    assert torch.equal(loaded["row"], torch.arange(300, dtype=torch.float32)[None])
