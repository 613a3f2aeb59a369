"""A1111 hypernetworks: the file (written by torch.save, read by the safe unpickler) builds the module ComfyUI
builds (comfy_extras/nodes_hypernetwork.py, transcribed in torch below), equal on random weights at several
strengths; on a tiny UNet, patched k/v inputs of every matching attention give diffusers' UNet with a
processor doing what ComfyUI's attn1/attn2 patch does; the plain and the accelerated forward agree; bad
files fail naming themselves."""

from __future__ import annotations

import zipfile

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.errors import CheckpointError
from sd.hypernetwork import attach_hypernetworks, load_hypernetwork
from sd.hypernetwork.module import Hypernetwork
from sd.synthetic.hypernetwork import random_modules, write_hypernetwork

TORCH_ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                     "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
                     "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign, "mish": torch.nn.Mish}


def save_a1111(path, modules, activation, layer_norm, activate_output=False, layer_structure=(1, 2, 1)):
    """What A1111 saves, through torch.save (the real pickle layout)."""
    state = {width: tuple({k: torch.from_numpy(v) for k, v in sd.items()} for sd in pair)
             for width, pair in modules.items()}
    state.update({"layer_structure": list(layer_structure), "activation_func": activation,
                  "is_layer_norm": layer_norm, "use_dropout": True, "last_layer_dropout": False,
                  "activate_output": activate_output, "step": 100, "name": "test", "sd_checkpoint": "abc"})
    torch.save(state, path)
    return path


def comfy_modules(path) -> dict[int, list[torch.nn.Sequential]]:
    """ComfyUI's load_hypernetwork_patch, transcribed (in eval mode: its Dropout layers do nothing)."""
    sd = torch.load(path, weights_only=True)
    activation_func = sd.get("activation_func", "linear")
    is_layer_norm = sd.get("is_layer_norm", False)
    use_dropout = sd.get("use_dropout", False)
    activate_output = sd.get("activate_output", False)
    last_layer_dropout = sd.get("last_layer_dropout", False)
    out = {}
    for d in sd:
        try:
            dim = int(d)
        except (TypeError, ValueError):
            continue
        output = []
        for index in [0, 1]:
            attn_weights = sd[dim][index]
            linears = [a[: -len(".weight")] for a in attn_weights.keys() if a.endswith(".weight")]
            layers = []
            i = 0
            while i < len(linears):
                lin_name = linears[i]
                last_layer = i == len(linears) - 1
                penultimate_layer = i == len(linears) - 2
                w, b = attn_weights[f"{lin_name}.weight"], attn_weights[f"{lin_name}.bias"]
                layer = torch.nn.Linear(w.shape[1], w.shape[0])
                layer.load_state_dict({"weight": w, "bias": b})
                layers.append(layer)
                if activation_func != "linear" and ((not last_layer) or activate_output):
                    layers.append(TORCH_ACTIVATIONS[activation_func]())
                if is_layer_norm:
                    i += 1
                    ln_name = linears[i]
                    ln = torch.nn.LayerNorm(attn_weights[f"{ln_name}.weight"].shape[0])
                    ln.load_state_dict({"weight": attn_weights[f"{ln_name}.weight"],
                                        "bias": attn_weights[f"{ln_name}.bias"]})
                    layers.append(ln)
                if use_dropout and (not last_layer) and (not penultimate_layer or last_layer_dropout):
                    layers.append(torch.nn.Dropout(p=0.3))
                i += 1
            output.append(torch.nn.Sequential(*layers).eval())
        out[dim] = output
    return out


def comfy_patch(hypernet: dict, strength: float, k: torch.Tensor, v: torch.Tensor):
    """ComfyUI's hypernetwork_patch.__call__ on the k/v inputs."""
    dim = k.shape[-1]
    if dim in hypernet:
        hn = hypernet[dim]
        k = k + hn[0](k) * strength
        v = v + hn[1](v) * strength
    return k, v


CASES = [("relu", False, False), ("relu", True, False), ("leakyrelu", False, True), ("elu", True, True),
         ("swish", False, False), ("tanh", True, False), ("sigmoid", False, False), ("softsign", True, False),
         ("mish", False, False), ("linear", True, False), ("linear", False, False)]


@pytest.mark.slow
@pytest.mark.parametrize("activation,layer_norm,activate_output", CASES)
def test_module_equals_comfyui_module(tmp_path, activation, layer_norm, activate_output):
    modules = random_modules([32, 64], layer_structure=(1, 2, 1.5, 1), activation=activation,
                             layer_norm=layer_norm, activate_output=activate_output, seed=7, scale=0.4)
    path = save_a1111(tmp_path / "hn.pt", modules, activation, layer_norm, activate_output, (1, 2, 1.5, 1))
    ours = load_hypernetwork(path)
    reference = comfy_modules(path)
    rng = np.random.default_rng(1)
    for width in (32, 64):
        x = rng.standard_normal((2, 9, width)).astype(np.float32)
        y = rng.standard_normal((2, 9, width)).astype(np.float32)
        for strength in (0.5, 1.0, -1.3):
            hn = Hypernetwork(*ours.modules[width], strength)
            k, v = hn(mx.array(x), mx.array(y))
            with torch.no_grad():
                k_ref, v_ref = comfy_patch(reference, strength, torch.from_numpy(x), torch.from_numpy(y))
            assert np.abs(np.array(k) - k_ref.numpy()).max() <= 1e-4
            assert np.abs(np.array(v) - v_ref.numpy()).max() <= 1e-4
            assert np.abs(np.array(k) - x).max() > 1e-3  # it does something


def test_the_torch_free_writer_writes_what_torch_reads(tmp_path):
    modules = random_modules([64], activation="tanh", layer_norm=True, seed=3)
    path = write_hypernetwork(tmp_path / "demo.pt", modules, activation="tanh", layer_norm=True)
    loaded = torch.load(path, weights_only=True)
    assert loaded["activation_func"] == "tanh" and loaded["is_layer_norm"] is True
    for index in (0, 1):
        assert list(loaded[64][index]) == list(modules[64][index])
        for key, value in modules[64][index].items():
            assert np.array_equal(loaded[64][index][key].numpy(), value)
    assert [layer.kind for layer in load_hypernetwork(path).modules[64][0]] == \
        ["linear", "act", "norm", "linear", "act", "norm"]  # ComfyUI activates the last Linear with LN


# ---------------------------------------------------------------------------------- on a tiny UNet
class ComfyHypernetworkProcessor:
    """A diffusers attention processor doing what ComfyUI's attn1/attn2 patch does: the hypernetwork on
    the k and v *inputs* (the context for cross-attention, the tokens themselves for self-attention)."""

    def __init__(self, hypernet, strength):
        self.hypernet, self.strength = hypernet, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_in, v_in = comfy_patch(self.hypernet, self.strength, context, context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(k_in), attn.to_v(v_in)
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    from sd.loading.checkpoint import load_component
    from sd.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("hn") / "unet.safetensors", parts=("unet",), seed=2)
    return path, load_component(path, "unet", dtype="float32")


@pytest.mark.slow  # diffusers' import alone takes ~15 s on a loaded 2-core machine
def test_unet_with_hypernetworks_equals_diffusers_with_comfyui_patch(tiny_unet, tmp_path):
    from reference import diffusers_unet, read_state

    from sd.accel.compiled import FastUNet
    from sd.models.unet import unet_config_from_weights

    checkpoint, ours_base = tiny_unet
    state = read_state(checkpoint)
    shapes = {k[len("model.diffusion_model."):]: tuple(v.shape) for k, v in state.items()}
    theirs = diffusers_unet(unet_config_from_weights(shapes), state)
    # widths of the tiny UNet: self-attention 32/64/128, cross-attention context 64; 128 left out
    modules = random_modules([32, 64], activation="relu", layer_norm=True, seed=11, scale=0.3)
    path = save_a1111(tmp_path / "hn.pt", modules, "relu", True)
    strength = 0.8
    ours = attach_hypernetworks(ours_base, [(load_hypernetwork(path), strength)])
    theirs.set_attn_processor(ComfyHypernetworkProcessor(comfy_modules(path), strength))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([20.0, 700.0], dtype=np.float32)
    context = rng.standard_normal((2, 77, 64)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    ref = ref.transpose(0, 2, 3, 1)
    args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(context))
    out = np.array(ours(*args))
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-4 * scale
    base = np.array(ours_base(*args))
    assert np.abs(base - ref).max() > 1e-2 * scale  # the hypernetwork moved the output
    fast = np.array(FastUNet(ours)(*args))  # the accelerated forward honours the patch too
    assert np.abs(fast - ref).max() <= 1e-4 * scale
    assert "kv_patches" not in ours_base.input_blocks[1][1].transformer_blocks[0].attn1  # base untouched


@pytest.mark.slow
def test_two_hypernetworks_chain_in_order(tiny_unet, tmp_path):
    _, ours_base = tiny_unet
    first = load_hypernetwork(write_hypernetwork(tmp_path / "a.pt", random_modules([64], seed=1, scale=0.3)))
    second = load_hypernetwork(write_hypernetwork(tmp_path / "b.pt", random_modules([64], seed=2, scale=0.3)))
    ours = attach_hypernetworks(ours_base, [(first, 0.7), (second, -0.4)])
    attn2 = ours.middle_block[1].transformer_blocks[0].attn2
    assert [p.strength for p in attn2.kv_patches] == [0.7, -0.4]
    context = mx.array(np.random.default_rng(4).standard_normal((1, 5, 64)).astype(np.float32))
    k1, v1 = Hypernetwork(*first.modules[64], 0.7)(context, context)
    k2, v2 = Hypernetwork(*second.modules[64], -0.4)(k1, v1)
    _, k, v = attn2._patched_projections(mx.zeros((1, 3, 128)), context)
    assert np.allclose(np.array(k), np.array(k2 @ attn2.to_k.weight.T), atol=1e-5)
    assert np.allclose(np.array(v), np.array(v2 @ attn2.to_v.weight.T), atol=1e-5)


# ------------------------------------------------------------------------------------------ bad files
def test_bad_files_fail_naming_the_file(tmp_path):
    modules = random_modules([64], seed=1)
    bad_activation = save_a1111(tmp_path / "gelu.pt", modules, "gelu", False)
    with pytest.raises(CheckpointError, match=r"gelu\.pt: .*activation_func 'gelu' is not supported"):
        load_hypernetwork(bad_activation)
    wrong = {64: (modules[64][0], {"linear.0.weight": np.zeros((128, 64), np.float32),
                                   "linear.0.bias": np.zeros(128, np.float32)})}
    with pytest.raises(CheckpointError, match=r"maps width 64 to 128"):
        load_hypernetwork(save_a1111(tmp_path / "wrong.pt", wrong, "relu", False))
    torch.save({"activation_func": "relu"}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt: not a hypernetwork"):
        load_hypernetwork(tmp_path / "empty.pt")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "st.pt"))
    with pytest.raises(CheckpointError, match=r"st\.pt: not a PyTorch \.pt file"):
        load_hypernetwork(tmp_path / "st.pt")
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    body = b"\x80\x02}(X\x03\x00\x00\x00768cos\nsystem\n(X" + len(f"touch {marker}").to_bytes(4, "little") \
        + f"touch {marker}".encode() + b"tRu."
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", body)
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match=r"evil\.pt: .*'os\.system'"):
        load_hypernetwork(evil)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("options", ["gpu", "cpu"])
def test_accelerated_backends_honour_the_patch(tiny_unet, tmp_path, options):
    """The fused/shared-projection levers (GPU defaults, compiled) and the CPU defaults give the plain
    forward's output with hypernetworks attached, and differ from the unpatched model."""
    from sd.accel.compiled import FastUNet
    from sd.accel.ops import default_options

    _, base = tiny_unet
    # scale 0.1: far larger than trained hypernetworks' residuals, small enough that the k/v inputs stay in
    # range (at 0.3 they reach ~10x, and column-sum GroupNorm's E[x^2] - E[x]^2 loses digits on them)
    hn = load_hypernetwork(write_hypernetwork(tmp_path / "h.pt", random_modules([32, 64, 128], seed=5,
                                                                                scale=0.1)))
    ours = attach_hypernetworks(base, [(hn, 1.0)])
    opts = default_options("unet", gpu=options == "gpu").with_(cuda_kernels=False)
    rng = np.random.default_rng(2)
    args = (mx.array(rng.standard_normal((1, 8, 8, 4)).astype(np.float32)), mx.array([300.0]),
            mx.array(rng.standard_normal((1, 77, 64)).astype(np.float32)))
    plain = np.array(ours(*args))
    fast = np.array(FastUNet(ours, opts)(*args))
    assert np.abs(fast - plain).max() <= 1e-4 * np.abs(plain).max()
    assert np.abs(np.array(FastUNet(base, opts)(*args)) - plain).max() > 1e-2 * np.abs(plain).max()


@pytest.mark.slow
def test_loader_node_and_merges_keep_hypernetworks_where_comfyui_does(tmp_path):
    from graph import Folders
    from graph.fingerprint import FingerprintIndex
    from nodes import loaders, merging, models
    from nodes.values import FileRef, HypernetworkPatch, ModelRecipe
    from sd.synthetic import make_checkpoint

    class Ctx:
        folders = Folders(tmp_path, tmp_path, tmp_path)
        fingerprint = FingerprintIndex().fingerprint
        messages: list[str] = []

        def log(self, msg):
            self.messages.append(msg)

    (tmp_path / "checkpoints").mkdir()
    a = FileRef.of(make_checkpoint(tmp_path / "checkpoints" / "a.safetensors", parts=("unet",), seed=0))
    b = FileRef.of(make_checkpoint(tmp_path / "checkpoints" / "b.safetensors", parts=("unet",), seed=1))
    (tmp_path / "hypernetworks").mkdir()
    write_hypernetwork(tmp_path / "hypernetworks" / "h.pt", random_modules([64], seed=1))
    ctx = Ctx()
    with_hn = loaders.HypernetworkLoader(ModelRecipe(a), "h.pt", 0.6, ctx=ctx)
    assert "widths 64" in ctx.messages[-1]
    merged = merging.ModelMergeSimple(with_hn, ModelRecipe(b), 0.5, ctx=ctx)
    assert isinstance(merged.patches[0], HypernetworkPatch) and merged.weight_patches == merged.patches[1:]
    unet = models.unet_for(merged)
    assert len(unet.middle_block[1].transformer_blocks[0].attn2.kv_patches) == 1  # model1's stays
    into = merging.ModelMergeSimple(ModelRecipe(b), with_hn, 0.5, ctx=ctx)  # model2's weights only
    assert "kv_patches" not in models.unet_for(into).middle_block[1].transformer_blocks[0].attn2
    assert "kv_patches" not in models.unet_for(ModelRecipe(a)).middle_block[1].transformer_blocks[0].attn2
    models.clear()
