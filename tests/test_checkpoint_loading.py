"""Strict checkpoint loading: real-file key variants load; damaged or foreign files fail with clear errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sd.errors import ArchitectureError, CheckpointError, MissingComponentError
from sd.loading.checkpoint import load_checkpoint, load_component, split_components
from sd.models.unet import UNetModel
from sd.synthetic import make_checkpoint
from sd.synthetic.clip import TINY_CLIP
from sd.synthetic.unet import TINY_UNET
from sd.synthetic.vae import TINY_VAE

U = "model.diffusion_model."
CLIP = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{key: array} of a complete tiny checkpoint (float32, real LDM layout)."""
    path = make_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", seed=4)
    return load_file(path)


def write(tmp_path, weights: dict, name: str = "edited.safetensors"):
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, path)
    return path


def ohwi(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(0, 2, 3, 1)


def conv_in(model: UNetModel) -> np.ndarray:
    return np.array(model.input_blocks[0][0].weight.astype(mx.float32))


@pytest.mark.slow
def test_complete_file_loads_every_part_with_its_config(tmp_path, tiny):
    ckpt = load_checkpoint(write(tmp_path, tiny))
    assert (ckpt.unet_config, ckpt.vae_config, ckpt.clip_config) == (TINY_UNET, TINY_VAE, TINY_CLIP)
    assert ckpt.require_unet() is ckpt.unet and ckpt.require_vae() and ckpt.require_clip()
    assert ckpt.unet.input_blocks[0][0].weight.dtype == mx.float32  # CPU default
    # OIHW in the file -> OHWI in MLX
    np.testing.assert_array_equal(conv_in(ckpt.unet), ohwi(tiny[U + "input_blocks.0.0.weight"]))


@pytest.mark.slow
def test_missing_keys_are_listed(tmp_path, tiny):
    gone = [k for k in tiny if k.startswith(U + "output_blocks.")][:8]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(write(tmp_path, {k: v for k, v in tiny.items() if k not in gone}))
    message = str(err.value)
    assert "8 missing" in message and "edited.safetensors" in message
    assert all(key in message for key in gone[:5]) and "3 more, 8 in all" in message


@pytest.mark.slow
def test_unexpected_keys_are_listed(tmp_path, tiny):
    extra = U + "input_blocks.1.0.extra_layer.weight"
    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.diffusion_model\.input_blocks\.1\.0\.e"):
        load_checkpoint(write(tmp_path, {**tiny, extra: np.zeros(3, np.float32)}))


def test_keys_of_no_component_are_listed(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="belong to no SD1.x component: some_adapter.weight"):
        load_checkpoint(write(tmp_path, {**tiny, "some_adapter.weight": np.zeros(3, np.float32)}))


@pytest.mark.slow
def test_misshaped_keys_are_listed_in_file_layout(tmp_path, tiny):
    edited = dict(tiny)
    edited[U + "input_blocks.1.0.emb_layers.1.weight"] = np.zeros((32, 100), np.float32)
    edited[U + "input_blocks.4.0.in_layers.2.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(write(tmp_path, edited))
    message = str(err.value)
    assert "2 with the wrong shape" in message
    assert "input_blocks.1.0.emb_layers.1.weight (file 32x100, expected 32x128)" in message
    assert "input_blocks.4.0.in_layers.2.weight (file 64x32x1x1, expected 64x32x3x3)" in message


@pytest.mark.slow
def test_real_file_extras_are_ignored(tmp_path, tiny):
    """EMA copies, DDPM buffers, float position_ids, a state_dict wrapper and Lightning extras (.ckpt)."""
    extras = {
        "betas": np.linspace(1e-4, 2e-2, 1000, dtype=np.float32),
        "alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32),
        "model.sqrt_alphas_cumprod": np.ones(1000, np.float32),
        "model_ema.decay": np.array(0.9999, np.float32),
        "model_ema.num_updates": np.array(1000, np.int64),
        "model_ema.input_blocks00weight": tiny[U + "input_blocks.0.0.weight"] * 0,
        CLIP + "text_model.embeddings.position_ids": np.arange(77, dtype=np.float32)[None],
    }
    path = tmp_path / "wrapped.ckpt"
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in {**tiny, **extras}.items()}
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, path)
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(conv_in(ckpt.unet), ohwi(tiny[U + "input_blocks.0.0.weight"]))


@pytest.mark.slow
def test_old_clip_layout_without_text_model_and_position_ids(tmp_path, tiny):
    """Files saved with pre-4.x transformers name CLIP keys without 'text_model.' and lack position_ids."""
    renamed = {}
    for key, value in tiny.items():
        if key.endswith("position_ids"):
            continue
        renamed[key.replace(CLIP + "text_model.", CLIP)] = value
    assert not any(k.startswith(CLIP + "text_model.") for k in renamed)
    ckpt = load_checkpoint(write(tmp_path, renamed))
    assert ckpt.clip_config == TINY_CLIP


@pytest.mark.slow
@pytest.mark.parametrize("edit, detected", [
    ("sd2_context", "SD2.x (cross-attention context width 1024"),
    ("sd2_linear_proj", "SD2.x (linear proj_in"),
    ("sd2_openclip", "SD2.x (found an OpenCLIP text encoder"),
    ("sdxl_conditioner", "SDXL (found 'conditioner.embedders.*'"),
    ("sdxl_label_emb", "'label_emb'"),
    ("pix2pix", "an instruct-pix2pix style model (8 input channels"),
])
def test_other_families_are_refused_naming_what_was_found(tmp_path, tiny, edit, detected):
    edited = dict(tiny)
    if edit == "sd2_context":
        for key, value in tiny.items():
            if "attn2.to_k" in key or "attn2.to_v" in key:
                edited[key] = np.zeros((value.shape[0], 1024), np.float32)
    elif edit == "sd2_linear_proj":
        for key, value in tiny.items():
            if key.endswith(("proj_in.weight", "proj_out.weight")):
                edited[key] = value[:, :, 0, 0]
    elif edit == "sd2_openclip":
        edited = {k: v for k, v in tiny.items() if not k.startswith(CLIP)}
        edited["cond_stage_model.model.token_embedding.weight"] = np.zeros((10, 8), np.float32)
    elif edit == "sdxl_conditioner":
        edited["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = np.ones(8)
    elif edit == "sdxl_label_emb":
        edited[U + "label_emb.0.0.weight"] = np.zeros((128, 2816), np.float32)
    elif edit == "pix2pix":
        edited[U + "input_blocks.0.0.weight"] = np.zeros((32, 8, 3, 3), np.float32)
    with pytest.raises(ArchitectureError) as err:
        load_checkpoint(write(tmp_path, edited))
    message = str(err.value)
    assert detected in message, message
    assert "only Stable Diffusion 1.x checkpoints are supported" in message
    assert "edited.safetensors" in message


@pytest.mark.slow
def test_unet_only_file_loads_and_missing_parts_error_clearly(tmp_path):
    path = make_checkpoint(tmp_path / "unet_only.safetensors", parts=("unet",))
    ckpt = load_checkpoint(path)
    assert ckpt.unet is not None and ckpt.vae is None and ckpt.clip is None and ckpt.vae_config is None
    with pytest.raises(MissingComponentError, match=r"unet_only\.safetensors: the checkpoint has no VAE "):
        ckpt.require_vae()
    with pytest.raises(MissingComponentError, match=r"no text encoder \(CLIP\) weights"):
        load_component(path, "clip")


@pytest.mark.slow
def test_load_component_reads_only_that_part(tmp_path, tiny):
    """A damaged text encoder does not stop a node that needs only the UNet (and is reported when asked)."""
    edited = dict(tiny)
    edited[CLIP + "text_model.final_layer_norm.weight"] = np.ones(5, np.float32)
    path = write(tmp_path, edited)
    unet = load_component(path, "unet")
    assert isinstance(unet, UNetModel)
    with pytest.raises(CheckpointError, match="text encoder"):
        load_component(path, "clip")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_load_exactly(tmp_path, fmt, dtype):
    path = make_checkpoint(tmp_path / f"half.{fmt}", dtype=dtype, seed=6)
    reference = torch.load(path, weights_only=True) if fmt == "ckpt" else None
    if reference is None:
        from safetensors.torch import load_file as load_torch

        reference = load_torch(path)
    expected = reference[U + "input_blocks.0.0.weight"].float().numpy().transpose(0, 2, 3, 1)
    ckpt = load_checkpoint(path)  # CPU default: float32, values exactly the file's
    np.testing.assert_array_equal(conv_in(ckpt.unet), expected)
    assert ckpt.clip is not None and ckpt.vae is not None
    half = load_checkpoint(path, dtype=dtype, parts=("unet",)).unet
    assert half.input_blocks[0][0].weight.dtype == getattr(mx, dtype)
    np.testing.assert_array_equal(conv_in(half), expected)


def test_split_components_sorts_keys_and_values():
    parts = split_components({
        U + "out.2.bias": 1,
        "first_stage_model.decoder.conv_in.bias": 2,
        CLIP + "text_model.final_layer_norm.bias": 3,
        CLIP + "final_layer_norm.weight": 4,
        CLIP + "text_model.embeddings.position_ids": 5,
        "model_ema.decay": 6,
        "alphas_cumprod": 7,
        "lora_unet_down.weight": 8,
    })
    assert parts["unet"] == {"out.2.bias": 1}
    assert parts["vae"] == {"decoder.conv_in.bias": 2}
    assert parts["clip"] == {"text_model.final_layer_norm.bias": 3, "text_model.final_layer_norm.weight": 4}
    assert set(parts["ignored"]) == {CLIP + "text_model.embeddings.position_ids", "model_ema.decay",
                                     "alphas_cumprod"}
    assert parts["unknown"] == {"lora_unet_down.weight": 8}
    assert split_components([U + "out.2.bias"])["unet"] == {"out.2.bias": U + "out.2.bias"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_loaded_weights_are_contiguous(tmp_path, tiny, dtype):
    """Conv weights are transposed OIHW -> OHWI on load; a strided view there would be copied again by every
    conv GEMM of every step (63 weight copies per SD1.5 UNet step on the GPU before this was fixed)."""
    from mlx.utils import tree_flatten

    ck = load_checkpoint(write(tmp_path, tiny), dtype=dtype)
    weights = [(name, w) for m in (ck.unet, ck.vae) for name, w in tree_flatten(m.parameters())]
    assert any(w.ndim == 4 for _, w in weights)
    strided = [name for name, w in weights if not memoryview(w).c_contiguous]
    assert not strided, strided[:5]
