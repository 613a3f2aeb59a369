"""Patches, not merges: strength linearity, chaining, pass-through, the base never modified, caching."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from lora_testing import kohya_pair, make_tiny, params, save

from sd.loading.checkpoint import load_checkpoint
from sd.lora import apply_lora_stack, apply_loras, load_lora

UNET_LAYERS = {  # kohya name -> our parameter (its shape is read off the tiny model)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "input_blocks.1.1.proj_in.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2":
        "middle_block.1.transformer_blocks.0.ff.net.2.weight",
    "lora_unet_up_blocks_1_resnets_2_conv1": "output_blocks.5.0.in_layers.2.weight",
}
TE_LAYERS = {"lora_te_text_model_encoder_layers_2_mlp_fc1": "text_model.encoder.layers.2.mlp.fc1.weight"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory)


def write_lora(path, seed: int, tiny: dict):
    rng, tensors = np.random.default_rng(seed), {}
    for layers, module in ((UNET_LAYERS, tiny["unet"]), (TE_LAYERS, tiny["clip"])):
        shapes = {k: v.shape for k, v in params(module).items()}
        for key, target in layers.items():
            shape = shapes[target]  # MLX layout: convs (O, kh, kw, I)
            kernel = tuple(shape[1:3]) if len(shape) == 4 else None
            tensors.update(kohya_pair(rng, key, shape[0], shape[-1], rank=4, alpha=2.0, kernel=kernel))
    return load_lora(save(path, tensors))


def deltas(patched_module, base_module) -> dict[str, np.ndarray]:
    new, base = params(patched_module), params(base_module)
    return {k: np.array(new[k]) - np.array(base[k]) for k in new if new[k] is not base[k]}


@pytest.mark.slow
def test_strength_is_linear_and_negative_works(tiny, tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", 0, tiny)
    full = deltas(apply_loras(tiny["unet"], [(lora, 1.0)], "unet"), tiny["unet"])
    half = deltas(apply_loras(tiny["unet"], [(lora, 0.5)], "unet"), tiny["unet"])
    neg = deltas(apply_loras(tiny["unet"], [(lora, -1.0)], "unet"), tiny["unet"])
    assert len(full) == len(UNET_LAYERS) and set(full) == set(half) == set(neg)
    for name in full:
        scale = np.abs(full[name]).max()
        assert scale > 1e-3
        assert np.abs(half[name] - 0.5 * full[name]).max() <= 1e-6 * max(scale, 1.0), name
        assert np.abs(neg[name] + full[name]).max() <= 1e-6 * max(scale, 1.0), name


@pytest.mark.slow
def test_base_untouched_and_removal_restores_it_bit_for_bit(tiny, tmp_path):
    lora = write_lora(tmp_path / "b.safetensors", 1, tiny)
    before = params(tiny["unet"])
    snapshot = {k: np.array(v) for k, v in before.items()}
    patched = apply_loras(tiny["unet"], [(lora, 0.8)], "unet")
    x, t, ctx = mx.ones((1, 8, 8, 4)), mx.array([5]), mx.ones((1, 3, 64))
    assert not np.allclose(np.array(patched(x, t, ctx)), np.array(tiny["unet"](x, t, ctx)))
    after = params(tiny["unet"])
    assert all(after[k] is before[k] for k in before), "the base module's arrays were replaced"
    assert all(np.array_equal(np.array(after[k]), snapshot[k]) for k in snapshot)
    # removing the LoRA (an empty or all-zero patch set) gives back the base itself
    assert apply_loras(tiny["unet"], [], "unet") is tiny["unet"]
    assert apply_loras(tiny["unet"], [(lora, 0.0)], "unet") is tiny["unet"]
    # unpatched arrays are shared, not copied
    new = params(patched)
    shared = [k for k in new if new[k] is before[k]]
    assert len(shared) == len(before) - len(UNET_LAYERS)


def test_two_chained_loras_equal_the_sum_of_their_deltas(tiny, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", 2, tiny)
    b = write_lora(tmp_path / "b.safetensors", 3, tiny)
    da = deltas(apply_loras(tiny["unet"], [(a, 0.7)], "unet"), tiny["unet"])
    db = deltas(apply_loras(tiny["unet"], [(b, -0.4)], "unet"), tiny["unet"])
    both = deltas(apply_loras(tiny["unet"], [(a, 0.7), (b, -0.4)], "unet"), tiny["unet"])
    for name in both:
        assert np.abs(both[name] - (da[name] + db[name])).max() <= 1e-6 * max(np.abs(both[name]).max(), 1.0)


def test_model_and_clip_strengths_are_separate(tiny, tmp_path):
    lora = write_lora(tmp_path / "c.safetensors", 4, tiny)
    clip = apply_loras(tiny["clip"], [(lora, 0.0)], "clip")
    assert clip is tiny["clip"]
    clip = apply_loras(tiny["clip"], [(lora, 1.0)], "text_encoder")
    assert set(deltas(clip, tiny["clip"])) == {"text_model.encoder.layers.2.mlp.fc1.weight"}
    tokens = mx.array([[49406, 320, 1125, 49407] + [49407] * 4])
    assert not np.allclose(np.array(clip(tokens).last_hidden_state),
                           np.array(tiny["clip"](tokens).last_hidden_state))


def test_the_same_file_gives_the_same_lora_and_a_changed_one_a_new_identity(tiny, tmp_path):
    # sd.lora keeps nothing between calls (the model store in nodes/models.py keeps parsed LoRAs and
    # patched modules): the same file parses to an equal LoRA and the same patch set to equal weights
    path = tmp_path / "d.safetensors"
    lora = write_lora(path, 5, tiny)
    again = load_lora(path)
    assert again.fingerprint == lora.fingerprint
    first = params(apply_loras(tiny["unet"], [(lora, 0.6)], "unet"))
    second = params(apply_loras(tiny["unet"], [(again, 0.6)], "unet"))
    assert all(np.array_equal(np.array(first[k]), np.array(second[k])) for k in first)
    assert load_lora(path, fingerprint="given").fingerprint == "given"  # the caller's identity wins
    changed = write_lora(path, 6, tiny)  # same name, new content: a new LoRA
    assert changed.fingerprint != lora.fingerprint


def test_coverage_report(tiny, tmp_path):
    lora = write_lora(tmp_path / "e.safetensors", 7, tiny)
    report = lora.coverage(unet=tiny["unet"], text_encoder=tiny["clip"])
    assert str(report) == "unet 4/4, text encoder 1/1"
    assert report.complete


def test_lora_stack_applies_model_and_clip_strengths(tiny, tmp_path):
    a = write_lora(tmp_path / "f.safetensors", 8, tiny)
    b = write_lora(tmp_path / "g.safetensors", 9, tiny)
    unet, clip = apply_lora_stack(tiny["unet"], tiny["clip"], [(a, 1.0, 0.0), (b, 0.5, -0.5)])
    for got, want in ((unet, apply_loras(tiny["unet"], [(a, 1.0), (b, 0.5)], "unet")),
                      (clip, apply_loras(tiny["clip"], [(b, -0.5)], "clip"))):
        got, want = params(got), params(want)
        assert got.keys() == want.keys()
        assert all(np.array_equal(np.array(got[k]), np.array(want[k])) for k in got)
    assert apply_lora_stack(tiny["unet"], None, [(a, 0.0, 1.0)]) == (tiny["unet"], None)


@pytest.mark.slow
def test_half_precision_weights_stay_half_and_get_the_fp32_sum(tiny, tmp_path):
    half = load_checkpoint(tiny["path"], dtype="float16")
    lora = write_lora(tmp_path / "h.safetensors", 10, tiny)
    patched = params(apply_loras(half.unet, [(lora, 0.8)], "unet"))
    base32 = params(apply_loras(tiny["unet"], [(lora, 0.8)], "unet"))
    for name in UNET_LAYERS.values():
        assert patched[name].dtype == mx.float16
        # the sum is formed in fp32 and rounded once: within fp16 rounding of the fp32 result
        ref = np.array(base32[name])
        assert np.abs(np.array(patched[name].astype(mx.float32)) - ref).max() <= 2e-3 * np.abs(ref).max()
