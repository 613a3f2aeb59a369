"""Bad LoRA input: other architectures, corrupted files, malformed layers -> LoRAError naming file and key."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from lora_testing import kohya_pair, make_tiny, params, randn, save

from sd.errors import LoRAError
from sd.lora import apply_loras, load_lora

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
ATTN2_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory)


def width(tiny) -> int:
    return params(tiny["unet"])["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].shape[0]


def test_sdxl_text_encoder_keys_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = save(tmp_path / "sdxl_lora.safetensors",
                {**kohya_pair(rng, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 4),
                 **kohya_pair(rng, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 4)})
    with pytest.raises(LoRAError, match=r"sdxl_lora\.safetensors.*lora_te[12]_text_model.*SDXL"):
        load_lora(path)


@pytest.mark.slow
def test_sdxl_unet_blocks_are_unmatched_and_named(tiny, tmp_path):
    rng, c = np.random.default_rng(1), width(tiny)
    # SDXL's UNet has 2+ transformer blocks per attention and attentions at down_blocks.2 with 10 blocks
    sdxl_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_5_attn1_to_q"
    path = save(tmp_path / "xl_unet.safetensors",
                {**kohya_pair(rng, TO_Q, c, c, 4), **kohya_pair(rng, sdxl_key, 640, 640, 4)})
    lora = load_lora(path)
    with pytest.raises(LoRAError, match=rf"xl_unet\.safetensors.*unet 1/2.*{sdxl_key}.*SDXL, SD2"):
        apply_loras(tiny["unet"], [(lora, 1.0)], "unet")
    with pytest.warns(UserWarning, match=sdxl_key):
        patched = apply_loras(tiny["unet"], [(lora, 1.0)], "unet", allow_partial=True)
    new, base = params(patched), params(tiny["unet"])
    changed = [k for k in new if new[k] is not base[k]]
    assert changed == ["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]


def test_sd2_sized_cross_attention_does_not_fit(tiny, tmp_path):
    rng, c = np.random.default_rng(2), width(tiny)
    path = save(tmp_path / "sd2.safetensors", kohya_pair(rng, ATTN2_TO_K, c, 1024, 4))  # SD2 context: 1024
    lora = load_lora(path)
    with pytest.raises(LoRAError, match=rf"sd2\.safetensors.*{ATTN2_TO_K}.*does not fit"):
        apply_loras(tiny["unet"], [(lora, 1.0)], "unet")
    assert str(lora.coverage(unet=tiny["unet"])) == "unet 0/1"


def test_corrupted_file(tmp_path):
    good = save(tmp_path / "good.safetensors", kohya_pair(np.random.default_rng(3), TO_Q, 32, 32, 4))
    data = good.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(LoRAError, match=r"broken\.safetensors.*corrupted"):
        load_lora(broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(LoRAError, match=r"garbage\.safetensors"):
        load_lora(garbage)
    with pytest.raises(LoRAError, match=r"missing\.safetensors.*not found"):
        load_lora(tmp_path / "missing.safetensors")


def test_rank_mismatch_between_up_and_down(tmp_path):
    rng = np.random.default_rng(4)
    path = save(tmp_path / "rank.safetensors", {f"{TO_Q}.lora_up.weight": randn(rng, 32, 4),
                                                f"{TO_Q}.lora_down.weight": randn(rng, 3, 32)})
    with pytest.raises(LoRAError, match=rf"rank\.safetensors.*{TO_Q}.*rank mismatch.*\(32, 4\).*\(3, 32\)"):
        load_lora(path)


def test_missing_half_of_a_pair_and_non_lora_files(tmp_path):
    rng = np.random.default_rng(5)
    path = save(tmp_path / "half.safetensors", {f"{TO_Q}.lora_up.weight": randn(rng, 32, 4)})
    with pytest.raises(LoRAError, match=rf"half\.safetensors.*{TO_Q}.*lacks.*down"):
        load_lora(path)
    path = save(tmp_path / "checkpoint.safetensors",
                {"model.diffusion_model.out.2.weight": randn(rng, 4, 32)})
    with pytest.raises(LoRAError, match=r"checkpoint\.safetensors.*no LoRA layers"):
        load_lora(path)


def test_unrecognised_keys_are_reported(tiny, tmp_path):
    rng, c = np.random.default_rng(6), width(tiny)
    path = save(tmp_path / "extra.safetensors", {**kohya_pair(rng, TO_Q, c, c, 4),
                                                 "lora_unet_something.weird_suffix": randn(rng, 3)})
    lora = load_lora(path)
    with pytest.raises(LoRAError, match=r"extra\.safetensors.*lora_unet_something\.weird_suffix"):
        apply_loras(tiny["unet"], [(lora, 1.0)], "unet")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        apply_loras(tiny["unet"], [(lora, 1.0)], "unet", allow_partial=True)
