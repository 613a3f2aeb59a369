"""GLIGEN (sd/gligen, nodes/gligen.py) against a torch transcription of ComfyUI's comfy/gligen.py (written
here) and diffusers' GLIGEN components (`GLIGENTextBoundingboxProjection`, `GatedSelfAttentionDense` inside a
UNet2DConditionModel with attention_type="gated") on the same random weights; where its changes reach
(alpha 0 is the model without GLIGEN, a box moves only its own token, an area entry's GLIGEN changes only
that area); the nodes, the file checks and the example workflow."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, pixels, run

from sd.accel.compiled import FastUNet
from sd.accel.ops import FastOptions
from sd.errors import CheckpointError
from sd.gligen import MAX_OBJECTS, GligenSource, load_gligen
from sd.loading.checkpoint import load_checkpoint
from sd.models.unet_extras import NO_EXTRAS
from sd.synthetic import make_checkpoint
from sd.synthetic.gligen import random_gligen_state, transformer_blocks, write_gligen
from sd.synthetic.unet import TINY_UNET, unet_shapes

KEY_DIM = TINY_UNET.context_dim  # the tiny CLIP's width: its pooled output is what a box carries

# --- a torch transcription of ComfyUI's comfy/gligen.py (inference; its CrossAttention is plain softmax) ---


def _linear(sd, name, x):
    return torch.nn.functional.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _layer_norm(sd, name, x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def comfy_cross_attention(sd, prefix, x, heads):
    q, k, v = (_linear(sd, f"{prefix}.{p}", x) for p in ("to_q", "to_k", "to_v"))
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, inner)
    return _linear(sd, f"{prefix}.to_out.0", out)


def comfy_gated_self_attention(sd, f, x, objs, heads=8):
    """GatedSelfAttentionDense.forward (scale 1): FeedForward(glu=True) is GEGLU with torch's exact gelu."""
    n_visual = x.shape[1]
    objs = _linear(sd, f"{f}.linear", objs)
    joint = _layer_norm(sd, f"{f}.norm1", torch.cat([x, objs], 1))
    attn = comfy_cross_attention(sd, f"{f}.attn", joint, heads)
    x = x + torch.tanh(sd[f"{f}.alpha_attn"]) * attn[:, :n_visual, :]
    h, gate = _linear(sd, f"{f}.ff.net.0.proj", _layer_norm(sd, f"{f}.norm2", x)).chunk(2, dim=-1)
    ff = _linear(sd, f"{f}.ff.net.2", h * torch.nn.functional.gelu(gate))
    return x + torch.tanh(sd[f"{f}.alpha_dense"]) * ff


def comfy_fourier(x, num_freqs=8, temperature=100):
    bands = temperature ** (torch.arange(num_freqs) / num_freqs)
    out = []
    for freq in bands:
        out += [torch.sin(freq * x), torch.cos(freq * x)]
    return torch.cat(out, -1)


def comfy_position_net(sd, boxes, masks, positive):
    masks = masks.unsqueeze(-1)
    xyxy = comfy_fourier(boxes)
    positive = positive * masks + (1 - masks) * sd["position_net.null_positive_feature"].view(1, 1, -1)
    xyxy = xyxy * masks + (1 - masks) * sd["position_net.null_position_feature"].view(1, 1, -1)
    h = torch.cat([positive, xyxy], -1)
    h = torch.nn.functional.silu(_linear(sd, "position_net.linears.0", h))
    h = torch.nn.functional.silu(_linear(sd, "position_net.linears.2", h))
    return _linear(sd, "position_net.linears.4", h)


def comfy_set_position_inputs(latent_shape, position_params, key_dim, max_objs=30):
    """Gligen.set_position's boxes, masks and conds (latent_shape NCHW, params (pooled, h, w, y, x))."""
    batch, _, h, w = latent_shape
    masks = torch.zeros([max_objs])
    boxes, positive = [], []
    for p in position_params:
        x1, y1, x2, y2 = p[4] / w, p[3] / h, (p[4] + p[2]) / w, (p[3] + p[1]) / h
        masks[len(boxes)] = 1.0
        boxes += [torch.tensor((x1, y1, x2, y2)).unsqueeze(0)]
        positive += [p[0]]
    boxes += [torch.zeros([max_objs - len(boxes), 4])]
    positive += [torch.zeros([max_objs - len(positive), key_dim])]
    return (torch.cat(boxes).unsqueeze(0).repeat(batch, 1, 1), masks.unsqueeze(0).repeat(batch, 1),
            torch.cat(positive).unsqueeze(0).repeat(batch, 1, 1))


# --- fixtures ---


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gligen")
    ckpt = make_checkpoint(root / "tiny.safetensors", seed=4, parts=("unet",))
    blocks = transformer_blocks(unet_shapes(TINY_UNET))
    state = random_gligen_state(blocks, KEY_DIM, seed=1)
    gligen = write_gligen(root / "gligen.safetensors", state)
    closed = random_gligen_state(blocks, KEY_DIM, seed=1, alpha=0.0)
    off = write_gligen(root / "gligen-off.safetensors", closed)
    return ckpt, gligen, off, {k: torch.from_numpy(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def unet(files):
    return load_checkpoint(files[0], dtype="float32", parts=("unet",)).unet


def _boxes(rng, n=2):
    return [(mx.array(rng.standard_normal((1, KEY_DIM)).astype(np.float32)), 3, 4, 1, 2),
            (mx.array(rng.standard_normal((1, KEY_DIM)).astype(np.float32)), 4, 6, 4, 6)][:n]


def _torch_params(boxes):
    return [(torch.from_numpy(np.array(p)), h, w, y, x) for p, h, w, y, x in boxes]


def _inputs(rng, batch=2, h=8, w=12):
    return (mx.array(rng.standard_normal((batch, h, w, 4)).astype(np.float32)),
            mx.array(np.full((batch,), 400.0, np.float32)),
            mx.array(rng.standard_normal((batch, 77, KEY_DIM)).astype(np.float32)))


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _fusers_in_order(state) -> list[str]:
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}

    def key(name):
        parts = name.split(".")
        return (order[parts[0]], int(parts[1]) if parts[0] != "middle_block" else 0)

    return sorted({k.split(".fuser.")[0] + ".fuser" for k in state if ".fuser." in k}, key=key)


# --- the modules ---


@pytest.mark.slow
def test_position_net_and_fusers_equal_comfyui_transcription(files):
    _, path, _, sd = files
    gligen = load_gligen(path)
    rng = np.random.default_rng(0)
    boxes = _boxes(rng)
    ours = gligen.objects(boxes, 8, 12)
    b, m, p = comfy_set_position_inputs((1, 4, 8, 12), _torch_params(boxes), KEY_DIM)
    with torch.no_grad():
        want = comfy_position_net(sd, b, m, p).numpy()
    assert ours.shape == (1, MAX_OBJECTS, KEY_DIM) and _rel(ours, want) < 1e-5
    names = _fusers_in_order(sd)
    assert len(gligen.fusers) == len(names) == 16  # SD1.5's transformer blocks, in forward order
    for fuser, name in zip(gligen.fusers, names, strict=True):
        dim = fuser.query_dim
        x = rng.standard_normal((2, 24, dim)).astype(np.float32)
        got = fuser(mx.array(x), ours)
        with torch.no_grad():
            objs = torch.from_numpy(want).repeat(2, 1, 1)
            ref = comfy_gated_self_attention(sd, name, torch.from_numpy(x), objs)
        assert _rel(got, ref.numpy()) < 1e-4, name
        assert _rel(got, x) > 1e-3  # the gates are open: the fuser does something


@pytest.mark.slow  # ~10 s, most of it importing diffusers
def test_unet_with_gligen_equals_diffusers_gated_unet_and_comfyui_transcription(files, unet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from reference import diffusers_unet_config, read_state

    ckpt, path, _, sd = files
    rng = np.random.default_rng(1)
    x, t, c = _inputs(rng)
    boxes = _boxes(rng)
    source = GligenSource(load_gligen(path), boxes)
    ours = np.array(unet(x, t, c, extras=source.unet_extras(x, t, c, [None])))
    plain = np.array(unet(x, t, c))

    config = diffusers_unet_config(unet.config)
    model = UNet2DConditionModel(**config, attention_type="gated")
    missing, unexpected = model.load_state_dict(convert_ldm_unet_checkpoint(read_state(ckpt), config),
                                                strict=False)
    assert not unexpected and all(".fuser." in k or k.startswith("position_net.") for k in missing)
    theirs = {n: m for n, m in model.named_modules() if n.endswith(".fuser")}
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    theirs_sorted = sorted(theirs, key=lambda n: (order[n.split(".")[0]], [int(p) for p in n.split(".")
                                                                            if p.isdigit()]))
    gligen_state = {}
    for ours_name, their_name in zip(_fusers_in_order(sd), theirs_sorted, strict=True):
        gligen_state.update({their_name + k[len(ours_name):]: v for k, v in sd.items()
                             if k.startswith(ours_name + ".")})
    gligen_state.update({k: v for k, v in sd.items() if k.startswith("position_net.")})
    missing, unexpected = model.load_state_dict(gligen_state, strict=False)
    assert not unexpected and not [k for k in missing if ".fuser." in k or k.startswith("position_net.")]
    model.eval()

    b, m, p = comfy_set_position_inputs((2, 4, 8, 12), _torch_params(boxes), KEY_DIM)
    nchw = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())
    args = (nchw, torch.from_numpy(np.array(t)), torch.from_numpy(np.array(c)))
    with torch.no_grad():
        want = model(*args, cross_attention_kwargs={"gligen": {"boxes": b, "masks": m,
                                                                "positive_embeddings": p}}).sample.numpy()
        # the same skeleton with ComfyUI's modules (the transcription above) in place of diffusers' own
        objs = comfy_position_net(sd, b, m, p)
        for ours_name, their_name in zip(_fusers_in_order(sd), theirs_sorted, strict=True):
            parent, _, attr = their_name.rpartition(".")
            block = model.get_submodule(parent)
            setattr(block, attr, _ComfyFuser(sd, ours_name))
        model.position_net = _Fixed(objs)
        comfy = model(*args, cross_attention_kwargs={"gligen": {}}).sample.numpy()
    ours = ours.transpose(0, 3, 1, 2)
    assert _rel(plain.transpose(0, 3, 1, 2), want) > 1e-3  # GLIGEN changes the output
    assert _rel(ours, want) < 1e-4
    assert _rel(ours, comfy) < 1e-4


class _ComfyFuser(torch.nn.Module):
    def __init__(self, sd, name):
        super().__init__()
        self.sd, self.name = sd, name

    def forward(self, x, objs):
        return comfy_gated_self_attention(self.sd, self.name, x, objs)


class _Fixed(torch.nn.Module):
    def __init__(self, objs):
        super().__init__()
        self.objs = objs

    def forward(self, **_):
        return self.objs


# --- where changes reach ---


@pytest.mark.slow
def test_closed_gates_give_the_unet_without_gligen_exactly(files, unet):
    rng = np.random.default_rng(2)
    x, t, c = _inputs(rng)
    source = GligenSource(load_gligen(files[2]), _boxes(rng))
    got = unet(x, t, c, extras=source.unet_extras(x, t, c, [None]))
    assert np.array_equal(np.array(got), np.array(unet(x, t, c)))


def test_a_box_moves_only_its_own_token(files):
    gligen = load_gligen(files[1])
    rng = np.random.default_rng(3)
    boxes = _boxes(rng)
    base = np.array(gligen.objects(boxes, 8, 12))
    moved = np.array(gligen.objects([boxes[0], (boxes[1][0], 4, 6, 0, 0)], 8, 12))
    assert np.array_equal(base[:, 0], moved[:, 0]) and np.array_equal(base[:, 2:], moved[:, 2:])
    assert np.abs(base[:, 1] - moved[:, 1]).max() > 1e-3
    # absent slots are the null token, whatever the boxes
    one = np.array(gligen.objects(boxes[:1], 8, 12))
    assert np.array_equal(one[:, 2:], base[:, 2:]) and np.array_equal(one[:, 1], one[:, 2])


@pytest.mark.slow
def test_gligen_on_an_area_entry_changes_only_that_area(files, unet):
    """calc_cond_batch: GLIGEN on a corner entry (ConditioningSetArea) changes the denoised output there
    only."""
    from sd.sampling.conds import CondBatcher, resolve
    from sd.sampling.model_sampling import SD1_MODEL_SAMPLING as ms

    rng = np.random.default_rng(4)
    x, _, c = _inputs(rng, batch=1, h=16, w=16)
    source = GligenSource(load_gligen(files[1]), _boxes(rng, 1))
    area = {"area": (8, 8, 0, 8), "strength": 1.0}  # h, w, y, x: the top right corner

    def unet_fn(x_in, t, context, extras=None):
        return unet(x_in, t, context, extras=extras or NO_EXTRAS)

    def denoised(with_gligen: bool):
        corner = {**area, **({"gligen": source} if with_gligen else {})}
        sides = resolve([[(c, {}), (c * 0.5, corner)]], x.shape, ms)
        return np.array(CondBatcher(unet_fn, sides, ms)(x, 5.0)[0])

    diff = np.abs(denoised(True) - denoised(False))[0, ..., 0]
    assert diff[:8, 8:].max() > 1e-4
    outside = np.ones_like(diff, dtype=bool)
    outside[:8, 8:] = False
    assert diff[outside].max() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("compiles", [True, False])
def test_fast_unet_runs_gligen_like_the_plain_forward(files, unet, compiles):
    """GLIGEN is a ModulePatch: compiled (one graph for the arrangement), new box tokens reach that graph."""
    rng = np.random.default_rng(5)
    x, t, c = _inputs(rng)
    gligen = load_gligen(files[1])
    fast = FastUNet(unet, FastOptions(compile=compiles, fused_qkv=True, shared_projections=True))
    for boxes in (_boxes(rng), _boxes(rng, 1)):
        extras = GligenSource(gligen, boxes).unet_extras(x, t, c, [None])
        assert not extras.has_hooks
        want = np.array(unet(x, t, c, extras=extras))
        assert _rel(fast(x, t, c, extras), want) < 1e-4
    assert len(fast._with_extras) == (1 if compiles else 0)
    assert _rel(fast(x, t, c), want) > 1e-3


# --- files ---


def test_reader_refuses_files_that_are_no_gligen_or_do_not_fit(files, tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 4), np.float32)}, str(other))
    with pytest.raises(CheckpointError, match="not a GLIGEN file"):
        load_gligen(other)
    state = random_gligen_state(transformer_blocks(unet_shapes(TINY_UNET)), KEY_DIM)
    state["input_blocks.1.1.transformer_blocks.0.fuser.attn.to_k.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.1\.transformer_blocks\.0\.fuser\.attn\.to_k"):
        load_gligen(write_gligen(tmp_path / "bad.safetensors", state))
    del state["input_blocks.1.1.transformer_blocks.0.fuser.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="lacks"):
        load_gligen(write_gligen(tmp_path / "short.safetensors", state))


def test_prefixed_keys_load_the_same(files, tmp_path):
    from safetensors.numpy import load_file

    state = load_file(str(files[1]))
    prefixed = write_gligen(tmp_path / "p.safetensors",
                            {"model.diffusion_model." + k: v for k, v in state.items()})
    a, b = load_gligen(files[1]), load_gligen(prefixed)
    boxes = _boxes(np.random.default_rng(6))
    assert np.array_equal(np.array(a.objects(boxes, 8, 8)), np.array(b.objects(boxes, 8, 8)))


# --- nodes and the workflow ---


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@pytest.mark.slow
def test_text_box_apply_accumulates_boxes_as_comfyui(world):
    from graph.context import ExecutionContext, Folders
    from nodes.conditioning import CLIPEncode
    from nodes.gligen import GligenBoxes, GLIGENLoader, GLIGENTextBoxApply
    from nodes.loaders import LoadCheckpoint
    from nodes.values import Conditioning, conditioning_from_bytes, conditioning_to_bytes
    folders = Folders(models_dir=world.models, input_dir=world.input, output_dir=world.output)
    ctx = ExecutionContext("box", "GLIGENTextBoxApply", folders, {}, world.cache)
    _, clip, _ = LoadCheckpoint("v1-5-pruned-emaonly.safetensors", ctx=ctx)
    model = GLIGENLoader("gligen_sd14_textbox_pruned.safetensors", ctx=ctx)
    prompt = CLIPEncode(clip, "a lake", ctx=ctx)
    two = Conditioning(entries=prompt.entries * 2)
    once = GLIGENTextBoxApply(two, clip, model, "a boat", 100, 64, 17, 40, ctx=ctx)
    twice = GLIGENTextBoxApply(once, clip, model, "a sun", ctx=ctx)
    for entry in twice:
        value = entry.options["gligen"]
        assert isinstance(value, GligenBoxes) and value.kind == "position" and value.model == model
        assert [b[1:] for b in value.boxes] == [(8, 12, 5, 2), (8, 8, 0, 0)]  # (h, w, y, x) // 8
        boat = CLIPEncode(clip, "a boat", ctx=ctx).pooled
        assert np.array_equal(np.array(value.boxes[0][0]), np.array(boat))
    assert "gligen" not in prompt.entries[0].options  # the input is not changed
    back = conditioning_from_bytes(conditioning_to_bytes(twice))
    got = back.entries[1].options["gligen"]
    assert got.model == model and [b[1:] for b in got.boxes] == [(8, 12, 5, 2), (8, 8, 0, 0)]
    assert np.array_equal(np.array(got.boxes[1][0]), np.array(twice.entries[1].options["gligen"].boxes[1][0]))


@pytest.mark.slow
def test_gligen_workflow_runs_after_demo_and_changes_the_image(world):
    result = run(world, WORKFLOWS / "gligen.yaml", *SMALL)
    assert result.rc == 0, result.err
    off = run(world, WORKFLOWS / "gligen.yaml", *SMALL, "--set", "bottle.text=a cat",
              "--set", "save.filename_prefix=other")
    assert off.rc == 0, off.err
    a, b = (pixels(world.output / n) for n in ("gligen_00001_.png", "other_00001_.png"))
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)  # the box's text reaches the image


def test_a_wrong_file_fails_validation_naming_it(world, tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / "notgligen.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(bad))
    result = run(world, WORKFLOWS / "gligen.yaml", *SMALL, "--set", f"gligen={bad}")
    assert result.rc == 2 and "not a GLIGEN file" in result.err and "gligen_name" in result.err
