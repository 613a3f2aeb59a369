"""LyCORIS LoHa / LoKr, LoCon Tucker, DoRA and the other key spellings, checked against the published
formulas written out here in torch (independently of sd/lora/deltas.py's numpy code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_testing import kohya_pair, make_tiny, params, randn, save, torch_layout

from sd.lora import apply_loras, load_lora

TOL = 1e-5
# Our (LDM) parameter -> the kohya diffusers-style layer name for it in the tiny UNet.
ATTN1 = "input_blocks.1.1.transformer_blocks.0.attn1"
KOHYA_ATTN1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
TO_Q, TO_K, TO_V = ((f"{ATTN1}.{n}", f"{KOHYA_ATTN1}_{n}") for n in ("to_q", "to_k", "to_v"))
TO_OUT = (f"{ATTN1}.to_out.0", f"{KOHYA_ATTN1}_to_out_0")
CONV1 = ("input_blocks.1.0.in_layers.2", "lora_unet_down_blocks_0_resnets_0_conv1")  # 32x32x3x3
CONV2 = ("input_blocks.1.0.out_layers.3", "lora_unet_down_blocks_0_resnets_0_conv2")
PROJ_IN = ("input_blocks.1.1.proj_in", "lora_unet_down_blocks_0_attentions_0_proj_in")  # 1x1 conv
TE_Q = ("text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).double()


def patched(tiny, tmp_path, tensors: dict, strength: float, component: str = "unet", name: str = "x"):
    """(patched, base) weights in torch layout, float64, for every parameter the file patches."""
    lora = load_lora(save(tmp_path / f"{name}.safetensors", tensors))
    base_module = tiny[component if component == "unet" else "clip"]
    new = params(apply_loras(base_module, [(lora, strength)], component))
    base = params(base_module)
    return ({k: t(torch_layout(new[k])) for k in new if new[k] is not base[k]},
            {k: t(torch_layout(base[k])) for k in base})


def check(got: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    err = float((got - expected).abs().max() / expected.abs().max())
    print(f"{label}: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.slow
def test_loha_linear_flat_conv_and_tucker_conv(tiny, tmp_path):
    rng, r, alpha, s = np.random.default_rng(0), 4, 3.0, 0.7
    lin = {f"hada_w{i}_{ab}": randn(rng, *shape)
           for i in "12" for ab, shape in (("a", (32, r)), ("b", (r, 32)))}
    flat = {f"hada_w{i}_{ab}": randn(rng, *shape)  # conv 32x32x3x3 stored flat as (O, I*kh*kw)
            for i in "12" for ab, shape in (("a", (32, r)), ("b", (r, 288)))}
    tucker = {f"hada_w{i}_{ab}": randn(rng, r, 32) for i in "12" for ab in "ab"}
    tucker.update({f"hada_t{i}": randn(rng, r, r, 3, 3) for i in "12"})
    tensors = {}
    for (_, key), parts in ((TO_Q, lin), (CONV1, flat), (CONV2, tucker)):
        tensors.update({f"{key}.{k}": v for k, v in parts.items()})
        tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    new, base = patched(tiny, tmp_path, tensors, s)
    assert set(new) == {TO_Q[0] + ".weight", CONV1[0] + ".weight", CONV2[0] + ".weight"}

    def plain(p):  # LoHa: (w1a w1b) * (w2a w2b) * alpha / rank
        return (t(p["hada_w1_a"]) @ t(p["hada_w1_b"])) * (t(p["hada_w2_a"]) @ t(p["hada_w2_b"])) * alpha / r

    def cp(p, i):  # CP/Tucker: W[o,i,k,l] = sum_ab t[a,b,k,l] w_a[a,o] w_b[b,i]
        return torch.einsum("abkl,ao,bi->oikl", t(p[f"hada_t{i}"]), t(p[f"hada_w{i}_a"]),
                            t(p[f"hada_w{i}_b"]))

    check(new[TO_Q[0] + ".weight"], base[TO_Q[0] + ".weight"] + s * plain(lin), "LoHa linear")
    check(new[CONV1[0] + ".weight"], base[CONV1[0] + ".weight"] + s * plain(flat).reshape(32, 32, 3, 3),
          "LoHa conv (flattened)")
    check(new[CONV2[0] + ".weight"],
          base[CONV2[0] + ".weight"] + s * cp(tucker, 1) * cp(tucker, 2) * alpha / r, "LoHa conv (Tucker)")


def test_lokr_full_factors_decomposed_w2_and_tucker_conv(tiny, tmp_path):
    rng, r, alpha, s = np.random.default_rng(1), 2, 1.5, 0.9
    full = {"lokr_w1": randn(rng, 4, 8), "lokr_w2": randn(rng, 8, 4)}  # 32x32, no rank: scale 1
    decomposed = {"lokr_w1": randn(rng, 4, 4), "lokr_w2_a": randn(rng, 8, r), "lokr_w2_b": randn(rng, r, 8)}
    conv = {"lokr_w1": randn(rng, 4, 4), "lokr_w2_a": randn(rng, r, 8), "lokr_w2_b": randn(rng, r, 8),
            "lokr_t2": randn(rng, r, r, 3, 3)}
    te = {"lokr_w1_a": randn(rng, 8, r), "lokr_w1_b": randn(rng, r, 8), "lokr_w2": randn(rng, 8, 8)}
    tensors = {}
    for (_, key), parts in ((TO_K, full), (TO_V, decomposed), (CONV2, conv)):
        tensors.update({f"{key}.{k}": v for k, v in parts.items()})
        tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    new, base = patched(tiny, tmp_path, tensors, s)
    check(new[TO_K[0] + ".weight"], base[TO_K[0] + ".weight"] + s * torch.kron(t(full["lokr_w1"]),
                                                                                 t(full["lokr_w2"])),
          "LoKr full factors (scale 1)")
    w2 = t(decomposed["lokr_w2_a"]) @ t(decomposed["lokr_w2_b"])
    check(new[TO_V[0] + ".weight"],
          base[TO_V[0] + ".weight"] + s * torch.kron(t(decomposed["lokr_w1"]), w2) * alpha / r,
          "LoKr decomposed w2 (alpha/rank)")
    w2 = torch.einsum("abkl,ao,bi->oikl", t(conv["lokr_t2"]), t(conv["lokr_w2_a"]), t(conv["lokr_w2_b"]))
    w1 = t(conv["lokr_w1"])[:, :, None, None].contiguous()
    expected = torch.kron(w1, w2.contiguous()) * alpha / r
    check(new[CONV2[0] + ".weight"], base[CONV2[0] + ".weight"] + s * expected, "LoKr conv (Tucker w2)")

    tensors = {f"{TE_Q[1]}.{k}": v for k, v in te.items()}
    tensors[f"{TE_Q[1]}.alpha"] = np.array(alpha, np.float32)
    new, base = patched(tiny, tmp_path, tensors, s, component="text_encoder", name="te")
    expected = torch.kron(t(te["lokr_w1_a"]) @ t(te["lokr_w1_b"]), t(te["lokr_w2"])) * alpha / r
    check(new[TE_Q[0] + ".weight"], base[TE_Q[0] + ".weight"] + s * expected,
          "LoKr text encoder (w1 decomposed)")


def test_locon_tucker_mid_and_linear_delta_on_1x1_conv(tiny, tmp_path):
    rng, r, alpha, s = np.random.default_rng(2), 3, 2.0, -0.6
    up, mid, down = randn(rng, 32, r, 1, 1), randn(rng, r, r, 3, 3), randn(rng, r, 32, 1, 1)
    tensors = {f"{CONV1[1]}.lora_up.weight": up, f"{CONV1[1]}.lora_mid.weight": mid,
               f"{CONV1[1]}.lora_down.weight": down, f"{CONV1[1]}.alpha": np.array(alpha, np.float32)}
    tensors.update(kohya_pair(rng, PROJ_IN[1], 32, 32, r, alpha))  # linear-shaped pair on a 1x1 conv
    new, base = patched(tiny, tmp_path, tensors, s)
    expected = torch.einsum("om,mnkl,ni->oikl", t(up[:, :, 0, 0]), t(mid), t(down[:, :, 0, 0])) * alpha / r
    check(new[CONV1[0] + ".weight"], base[CONV1[0] + ".weight"] + s * expected, "LoCon Tucker (lora_mid)")
    lin = t(tensors[f"{PROJ_IN[1]}.lora_up.weight"]) @ t(tensors[f"{PROJ_IN[1]}.lora_down.weight"])
    check(new[PROJ_IN[0] + ".weight"], base[PROJ_IN[0] + ".weight"] + s * (lin * alpha / r)[:, :, None, None],
          "linear delta on 1x1 conv proj_in")


def dora_reference(w, delta, magnitude, per_input: bool, strength: float):
    """DoRA: W' = m * V / ||V||, V = W + dW; norm per input channel (LyCORIS default) or per output
    channel (PEFT); strength s blends as W + s (W' - W) (ComfyUI)."""
    v = w + delta
    dims = [d for d in range(v.ndim) if d != (1 if per_input else 0)]
    norm = v.pow(2).sum(dim=dims, keepdim=True).sqrt()
    m = magnitude.reshape(norm.shape)
    return w + strength * (m * v / norm - w)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_dora_lycoris_and_peft_magnitudes(tiny, tmp_path, strength):
    rng, r, alpha = np.random.default_rng(3), 4, 2.0
    tensors = kohya_pair(rng, TO_V[1], 32, 32, r, alpha)
    tensors[f"{TO_V[1]}.dora_scale"] = np.abs(randn(rng, 1, 32)) + 0.5  # LyCORIS: per input channel
    conv = kohya_pair(rng, CONV1[1], 32, 32, r, alpha, kernel=(3, 3))
    conv[f"{CONV1[1]}.dora_scale"] = np.abs(randn(rng, 1, 32, 1, 1)) + 0.5
    tensors.update(conv)
    peft_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    peft = {f"{peft_key}.lora_A.weight": randn(rng, r, 32), f"{peft_key}.lora_B.weight": randn(rng, 32, r),
            f"{peft_key}.lora_magnitude_vector": np.abs(randn(rng, 32)) + 0.5}  # PEFT: per output channel
    new, base = patched(tiny, tmp_path, {**tensors, **peft}, strength, name=f"dora{strength}")

    def kohya_delta(key):
        up, down = t(tensors[f"{key}.lora_up.weight"]), t(tensors[f"{key}.lora_down.weight"])
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / r

    w = base[TO_V[0] + ".weight"]
    check(new[TO_V[0] + ".weight"],
          dora_reference(w, kohya_delta(TO_V[1]), t(tensors[f"{TO_V[1]}.dora_scale"]), True, strength),
          "DoRA linear, LyCORIS per-input magnitude")
    w = base[CONV1[0] + ".weight"]
    check(new[CONV1[0] + ".weight"],
          dora_reference(w, kohya_delta(CONV1[1]), t(conv[f"{CONV1[1]}.dora_scale"]), True, strength),
          "DoRA conv, LyCORIS per-input magnitude")
    w = base[TO_OUT[0] + ".weight"]
    delta = t(peft[f"{peft_key}.lora_B.weight"]) @ t(peft[f"{peft_key}.lora_A.weight"])
    check(new[TO_OUT[0] + ".weight"],
          dora_reference(w, delta, t(peft[f"{peft_key}.lora_magnitude_vector"]), False, strength),
          "DoRA PEFT per-output magnitude")


# diffusers' older spellings: the same up/down pair under each must patch the same weight
SPELLINGS = {
    "processor": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight", TO_Q[0]),
    "processor_to_out": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
        TO_OUT[0]),
    "lora_linear_layer": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_linear_layer.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_linear_layer.up.weight",
        TO_K[0]),
    "dot_lora": ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora.down.weight",
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.lora.up.weight", TO_V[0]),
    "ldm_dotted": ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight",
                   "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight",
                   TO_Q[0]),
    "te_lora_linear_layer": (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", TE_Q[0]),
    "te_processor": ("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",
                     "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight", TE_Q[0]),
}


@pytest.mark.slow
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_diffusers_key_spellings(tiny, tmp_path, spelling):
    down_key, up_key, target = SPELLINGS[spelling]
    component = "text_encoder" if down_key.startswith("text_encoder") else "unet"
    width = 64 if component == "text_encoder" else 32
    rng = np.random.default_rng(4)
    down, up = randn(rng, 4, width), randn(rng, width, 4)
    new, base = patched(tiny, tmp_path, {down_key: down, up_key: up}, 0.8, component, name=spelling)
    assert set(new) == {target + ".weight"}
    check(new[target + ".weight"], base[target + ".weight"] + 0.8 * t(up) @ t(down), spelling)


def test_pickled_ckpt_lora_matches_safetensors(tiny, tmp_path):
    """A `.ckpt` LoRA (PyTorch zip, read by the restricted unpickler) gives the same patch."""
    rng = np.random.default_rng(5)
    tensors = {**kohya_pair(rng, TO_Q[1], 32, 32, 4, alpha=1.0), **kohya_pair(rng, TE_Q[1], 64, 64, 4)}
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "lora.ckpt")
    from_ckpt = load_lora(tmp_path / "lora.ckpt")
    from_st = load_lora(save(tmp_path / "lora.safetensors", tensors))
    a = params(apply_loras(tiny["unet"], [(from_ckpt, 0.9)], "unet"))[TO_Q[0] + ".weight"]
    b = params(apply_loras(tiny["unet"], [(from_st, 0.9)], "unet"))[TO_Q[0] + ".weight"]
    assert np.array_equal(np.array(a), np.array(b))
    assert str(from_ckpt.coverage(tiny["unet"], tiny["clip"])) == "unet 1/1, text encoder 1/1"


def test_peft_text_encoder_keys_without_text_model_level(tiny, tmp_path):
    """transformers 5 names CLIP's layers without `text_model.`; diffusers saves them that way."""
    rng = np.random.default_rng(6)
    down, up = randn(rng, 4, 64), randn(rng, 64, 4)
    key = "text_encoder.encoder.layers.0.self_attn.q_proj"
    new, base = patched(tiny, tmp_path, {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, 1.0,
                        "text_encoder", name="t5")
    check(new[TE_Q[0] + ".weight"], base[TE_Q[0] + ".weight"] + t(up) @ t(down),
          "PEFT TE, transformers 5 names")


def test_dora_peft_conv_magnitude_and_text_encoder(tiny, tmp_path):
    """PEFT stores a conv's per-output magnitude as (1, O, 1, 1): on a square conv that shape must not be
    read as LyCORIS' per-input (1, I, 1, 1). Text encoder DoRA with a kohya per-input dora_scale."""
    rng, r = np.random.default_rng(7), 4
    key = "unet.down_blocks.0.attentions.0.proj_in"
    peft = {f"{key}.lora_A.weight": randn(rng, r, 32, 1, 1), f"{key}.lora_B.weight": randn(rng, 32, r, 1, 1),
            f"{key}.lora_magnitude_vector": np.abs(randn(rng, 1, 32, 1, 1)) + 0.5}
    new, base = patched(tiny, tmp_path, peft, 1.0, name="peft_conv_dora")
    delta = (t(peft[f"{key}.lora_B.weight"])[:, :, 0, 0] @ t(peft[f"{key}.lora_A.weight"])[:, :, 0, 0])
    w = base[PROJ_IN[0] + ".weight"]
    check(new[PROJ_IN[0] + ".weight"],
          dora_reference(w, delta[:, :, None, None], t(peft[f"{key}.lora_magnitude_vector"]), False, 1.0),
          "DoRA PEFT conv (1, O, 1, 1) magnitude")

    te = kohya_pair(rng, TE_Q[1], 64, 64, r, alpha=2.0)
    te[f"{TE_Q[1]}.dora_scale"] = np.abs(randn(rng, 1, 64)) + 0.5
    new, base = patched(tiny, tmp_path, te, 0.7, component="text_encoder", name="te_dora")
    delta = t(te[f"{TE_Q[1]}.lora_up.weight"]) @ t(te[f"{TE_Q[1]}.lora_down.weight"]) * 2.0 / r
    check(new[TE_Q[0] + ".weight"],
          dora_reference(base[TE_Q[0] + ".weight"], delta, t(te[f"{TE_Q[1]}.dora_scale"]), True, 0.7),
          "DoRA text encoder, per-input dora_scale")
