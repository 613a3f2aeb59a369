"""Model merging as recipe patches: every merge node equals a numpy transcription of ComfyUI's semantics
(comfy_extras/nodes_model_merging.py + comfy/lora.py calculate_weight) over the same two state dicts, for
every ratio layout; chained with LoRAs in any order; bases untouched; 9-channel inpainting UNets merged as
ComfyUI does (the mismatched input conv is kept); a merged UNet runs exactly as one loaded from pre-merged
weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from nodes import loaders, merging, models
from nodes.demo import write_kohya_lora
from nodes.values import ClipRecipe, FileRef, ModelRecipe
from sd.loading.checkpoint import load_component
from sd.synthetic import make_checkpoint

UNET, CLIP = "model.diffusion_model.", "cond_stage_model.transformer."


class Ctx:
    def __init__(self, folders=None):
        self.folders = folders
        self.messages: list[str] = []
        from graph.fingerprint import FingerprintIndex

        self.fingerprint = FingerprintIndex().fingerprint

    def log(self, msg: str) -> None:
        self.messages.append(msg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = make_checkpoint(root / "a.safetensors", seed=0)
    b = make_checkpoint(root / "b.safetensors", seed=1)
    lora = write_kohya_lora(root / "lora.safetensors", a, seed=5, scale=0.2)
    return {"a": a, "b": b, "lora": lora, "root": root}


@pytest.fixture(scope="module", autouse=True)
def _fresh_store():
    models.clear()  # the bases load once for the module; every recipe below is built from them
    yield
    models.clear()


# ---------------------------------------------------------------- ComfyUI's semantics, transcribed in numpy
def comfy_strengths(node: str, key: str, **args) -> tuple[float, float] | None:
    """(strength_patch, strength_model) ComfyUI's node passes to add_patches for `key` (prefix-stripped)."""
    if node in ("CLIPMergeSimple", "CLIPMergeSubtract", "CLIPMergeAdd") and (
            key.endswith(".position_ids") or key.endswith(".logit_scale")):
        return None
    if node in ("ModelMergeSimple", "CLIPMergeSimple"):
        return 1.0 - args["ratio"], args["ratio"]
    if node in ("ModelMergeSubtract", "CLIPMergeSubtract"):
        return -args["multiplier"], args["multiplier"]
    if node in ("ModelMergeAdd", "CLIPMergeAdd"):
        return 1.0, 1.0
    # ModelMergeBlocks / ModelMergeSD1: kwargs in input order, longest matching name wins
    kwargs = args["kwargs"]
    ratio, last = next(iter(kwargs.values())), 0
    for arg in kwargs:
        if key.startswith(arg) and last < len(arg):
            ratio, last = kwargs[arg], len(arg)
    return 1.0 - ratio, ratio


def calculate_weight(w1: np.ndarray, w2: np.ndarray, sp: float, sm: float) -> np.ndarray:
    """comfy.lora.calculate_weight for one (strength_patch, [w2], strength_model) 'diff' patch."""
    w = w1.astype(np.float32).copy()
    if sm != 1.0:
        w *= sm
    if sp != 0.0 and w2.shape == w.shape:
        w += sp * w2.astype(np.float32)
    return w


def comfy_merge(sd1: dict, sd2: dict, prefix: str, node: str, **args) -> dict:
    out = {k[len(prefix):]: v.astype(np.float32) for k, v in sd1.items() if k.startswith(prefix)}
    for k, w2 in sd2.items():
        if not k.startswith(prefix) or k[len(prefix):] not in out:
            continue
        name = k[len(prefix):]
        strengths = comfy_strengths(node, name, **args)
        if strengths is not None:
            out[name] = calculate_weight(out[name], w2, *strengths)
    return out


def torch_layout(params: dict[str, mx.array]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in params.items():
        a = np.array(value.astype(mx.float32))
        out[name] = a.transpose(0, 3, 1, 2) if a.ndim == 4 else a
    return out


def clip_names(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def assert_equal_weights(module, expected: dict, atol: float = 1e-6) -> None:
    ours = torch_layout(dict(tree_flatten(module.parameters())))
    assert set(ours) <= set(expected), sorted(set(ours) - set(expected))[:3]
    worst = max(float(np.abs(ours[k] - expected[k]).max()) for k in ours)
    assert worst <= atol, worst


SD1_KWARGS = {name: round(0.05 + 0.9 * ((i * 7) % 31) / 31, 4) for i, name in enumerate(merging.SD1_INPUTS)}
MODEL_CASES = [
    ("ModelMergeSimple", {"ratio": 0.3}),
    ("ModelMergeSimple", {"ratio": 0.0}),
    ("ModelMergeBlocks", {"input": 0.2, "middle": 0.55, "out": 0.9}),
    ("ModelMergeSubtract", {"multiplier": 1.0}),
    ("ModelMergeSubtract", {"multiplier": -0.4}),
    ("ModelMergeAdd", {}),
    ("ModelMergeSD1", SD1_KWARGS),
]


def _comfy_args(node: str, args: dict) -> dict:
    if node == "ModelMergeBlocks":
        return {"kwargs": dict(args)}
    if node == "ModelMergeSD1":  # ComfyUI's input names are the key prefixes
        return {"kwargs": {merging.SD1_INPUTS[k]: v for k, v in args.items()}}
    return args


@pytest.mark.slow
@pytest.mark.parametrize("node,args", MODEL_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MODEL_CASES)])
def test_model_merge_nodes_equal_comfyui_semantics(files, node, args):
    a, b = FileRef.of(files["a"]), FileRef.of(files["b"])
    recipe = getattr(merging, node)(ModelRecipe(a), ModelRecipe(b), ctx=Ctx(), **args)
    expected = comfy_merge(load_file(files["a"]), load_file(files["b"]), UNET, node,
                           **_comfy_args(node, args))
    assert_equal_weights(models.unet_for(recipe), expected)


CLIP_CASES = [("CLIPMergeSimple", {"ratio": 0.35}), ("CLIPMergeSubtract", {"multiplier": 0.7}),
              ("CLIPMergeAdd", {})]


@pytest.mark.slow
@pytest.mark.parametrize("node,args", CLIP_CASES, ids=[n for n, _ in CLIP_CASES])
def test_clip_merge_nodes_equal_comfyui_semantics(files, node, args):
    a, b = FileRef.of(files["a"]), FileRef.of(files["b"])
    recipe = getattr(merging, node)(ClipRecipe(a, stop_at_layer=-2), ClipRecipe(b), ctx=Ctx(), **args)
    assert recipe.stop_at_layer == -2  # clip1's clip skip stays
    expected = comfy_merge(clip_names(load_file(files["a"])), load_file(files["b"]), CLIP, node, **args)
    assert_equal_weights(models.clip_for(recipe), expected)


def test_block_ratios_pick_the_longest_prefix_and_default_to_the_first():
    from sd.merge import rules

    rule = rules.blocks({merging.SD1_INPUTS[k]: v for k, v in SD1_KWARGS.items()})
    assert rule.strengths("input_blocks.11.0.emb_layers.1.weight")[1] == SD1_KWARGS["input_blocks_11"]
    assert rule.strengths("input_blocks.1.1.proj_in.weight")[1] == SD1_KWARGS["input_blocks_1"]
    assert rule.strengths("out.2.bias")[1] == SD1_KWARGS["out"]
    blocks = rules.blocks({"input": 0.1, "middle": 0.2, "out": 0.3})
    assert blocks.strengths("output_blocks.3.0.skip_connection.weight") == pytest.approx((0.7, 0.3))
    assert blocks.strengths("time_embed.0.weight") == pytest.approx((0.9, 0.1))  # the first input's ratio
    assert rules.simple(1.0).is_identity and not rules.simple(0.5).is_identity


def lora_deltas(lora_path) -> dict[str, np.ndarray]:
    """kohya up @ down * alpha / rank, by UNet parameter name (LDM-style kohya names)."""
    sd = load_file(lora_path)
    out = {}
    for key in sd:
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up = sd[key], sd[stem + ".lora_up.weight"]
            scale = float(sd[stem + ".alpha"]) / down.shape[0]
            out[stem] = (up @ down) * scale
    return out


def _lora_name(name: str) -> str:
    return "lora_unet_" + name.removesuffix(".weight").replace(".", "_")


@pytest.mark.slow
def test_merges_chain_with_loras_in_any_order_and_leave_the_bases_alone(files):
    ctx = Ctx()
    a, b = FileRef.of(files["a"]), FileRef.of(files["b"])
    base_a, base_b = ModelRecipe(a), ModelRecipe(b)
    lora = FileRef.of(files["lora"])
    deltas = lora_deltas(files["lora"])
    sd_a = {k[len(UNET):]: v for k, v in load_file(files["a"]).items() if k.startswith(UNET)}
    sd_b = {k[len(UNET):]: v for k, v in load_file(files["b"]).items() if k.startswith(UNET)}

    def with_lora(sd, s):
        return {k: v + s * deltas[_lora_name(k)] if _lora_name(k) in deltas else v for k, v in sd.items()}

    r = 0.4
    lora_then_merge = merging.ModelMergeSimple(base_a.with_lora(lora, 0.8), base_b, r, ctx=ctx)
    merge_then_lora = merging.ModelMergeSimple(base_a, base_b, r, ctx=ctx).with_lora(lora, 0.8)
    other_lora = merging.ModelMergeSimple(base_a, base_b.with_lora(lora, -0.5), r, ctx=ctx)
    three = merging.ModelMergeAdd(lora_then_merge, merging.ModelMergeSubtract(base_b, base_a, 0.5, ctx=ctx),
                                  ctx=ctx)

    def mix(x, y, ratio=r):
        return {k: ratio * x[k] + (1 - ratio) * y[k] for k in x}

    expect = {
        "lora_then_merge": mix(with_lora(sd_a, 0.8), sd_b),
        "merge_then_lora": with_lora(mix(sd_a, sd_b), 0.8),
        "other_lora": mix(sd_a, with_lora(sd_b, -0.5)),
    }
    expect["three"] = {k: expect["lora_then_merge"][k] + 0.5 * (sd_b[k] - sd_a[k]) for k in sd_a}
    for name, recipe in [("lora_then_merge", lora_then_merge), ("merge_then_lora", merge_then_lora),
                         ("other_lora", other_lora), ("three", three)]:
        assert_equal_weights(models.unet_for(recipe), expect[name], atol=2e-6)
    assert lora_then_merge != merge_then_lora  # order is part of the recipe (and of its store key)
    # the bases, built first and shared by every recipe above, still hold the files' weights
    assert_equal_weights(models.unet_for(base_a), sd_a, atol=0)
    assert_equal_weights(models.unet_for(base_b), sd_b, atol=0)


@pytest.mark.slow
def test_a_merged_unet_runs_exactly_as_one_loaded_from_premerged_weights(files):
    a, b = FileRef.of(files["a"]), FileRef.of(files["b"])
    recipe = merging.ModelMergeBlocks(ModelRecipe(a), ModelRecipe(b), 0.25, 0.6, 0.8, ctx=Ctx())
    merged = comfy_merge(load_file(files["a"]), load_file(files["b"]), UNET, "ModelMergeBlocks",
                         kwargs={"input": 0.25, "middle": 0.6, "out": 0.8})
    save_file({UNET + k: v for k, v in merged.items()}, str(files["root"] / "premerged.safetensors"))
    reference = load_component(files["root"] / "premerged.safetensors", "unet")
    ours = models.unet_for(recipe)
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    t = mx.array([10.0, 500.0])
    context = mx.array(rng.standard_normal((2, 77, 64)).astype(np.float32))
    out, ref = ours(x, t, context), reference(x, t, context)
    assert float(mx.abs(out - ref).max()) <= 1e-6
    fast = models.fast_unet(ours)(x, t, context)  # the accelerated path sees the merged weights too
    assert float(mx.abs(fast - ref).max()) <= 1e-4 * float(mx.abs(ref).max())


# ------------------------------------------------------------------------------ 9-channel inpainting UNets
def _unet(in_channels: int, seed: int):
    from dataclasses import replace

    from sd.models.unet import UNetModel
    from sd.synthetic.unet import TINY_UNET

    mx.random.seed(seed)
    model = UNetModel(replace(TINY_UNET, in_channels=in_channels))
    mx.eval(model.parameters())
    return model


@pytest.mark.slow
def test_add_difference_keeps_the_inpainting_input_conv_at_the_state_dict_level():
    from sd.lora.patching import MergeStep, apply_patches
    from sd.merge import rules

    inpaint, custom, base = _unet(9, 1), _unet(4, 2), _unet(4, 3)
    sd = {name: torch_layout(dict(tree_flatten(m.parameters()))) for name, m in
          (("inpaint", inpaint), ("custom", custom), ("base", base))}
    # ComfyUI's recipe: ModelMergeAdd(inpaint, ModelMergeSubtract(custom, base, 1.0))
    difference = apply_patches(custom, [MergeStep(base, rules.subtract(1.0))], "unet")
    result = apply_patches(inpaint, [MergeStep(difference, rules.add())], "unet")
    diff_ref = {k: calculate_weight(sd["custom"][k], sd["base"][k], -1.0, 1.0) for k in sd["custom"]}
    expected = {k: calculate_weight(sd["inpaint"][k], diff_ref[k], 1.0, 1.0) for k in sd["inpaint"]}
    assert_equal_weights(result, expected, atol=2e-6)
    first = "input_blocks.0.0.weight"
    got = torch_layout(dict(tree_flatten(result.parameters())))
    assert got[first].shape == (32, 9, 3, 3) and np.array_equal(got[first], sd["inpaint"][first])
    assert not np.allclose(got["out.2.weight"], sd["inpaint"]["out.2.weight"])  # the rest did change
    # the other order of ComfyUI's example: Subtract(inpaint, base) then Add(custom): same keys kept
    other = apply_patches(apply_patches(inpaint, [MergeStep(base, rules.subtract(1.0))], "unet"),
                          [MergeStep(custom, rules.add())], "unet")
    assert np.array_equal(torch_layout(dict(tree_flatten(other.parameters())))[first], sd["inpaint"][first])
    # a mismatched weight is still scaled by strength_model (ComfyUI applies it before the shape check)
    simple = apply_patches(inpaint, [MergeStep(custom, rules.simple(0.25))], "unet")
    simple_first = torch_layout(dict(tree_flatten(simple.parameters())))[first]
    assert np.allclose(simple_first, 0.25 * sd["inpaint"][first], atol=1e-7)
    # and the inputs are untouched
    assert np.array_equal(torch_layout(dict(tree_flatten(inpaint.parameters())))[first], sd["inpaint"][first])


@pytest.mark.slow
def test_a_merge_of_differently_shaped_unets_says_what_it_keeps(files):
    inpaint = make_checkpoint(files["root"] / "inpaint.safetensors", seed=4, parts=("unet",))
    sd = load_file(inpaint)
    key = UNET + "input_blocks.0.0.weight"
    sd[key] = np.concatenate([sd[key], np.zeros((sd[key].shape[0], 5, 3, 3), np.float32)], axis=1)
    save_file(sd, str(inpaint))
    ctx = Ctx()
    recipe = merging.ModelMergeSubtract(ModelRecipe(FileRef.of(inpaint)), ModelRecipe(FileRef.of(files["a"])),
                                        1.0, ctx=ctx)
    assert len(recipe.patches) == 1
    warned = [m for m in ctx.messages if "input_blocks.0.0.weight" in m]
    assert len(warned) == 1 and "not merged" in warned[0] and "(32, 9, 3, 3)" in warned[0]
    assert len([m for m in ctx.messages if m.startswith("warning")]) == 1  # only that one weight differs


@pytest.mark.slow
def test_ratio_one_is_a_pass_through_and_lora_loader_still_applies(files, tmp_path):
    from graph import Folders

    a, b = FileRef.of(files["a"]), FileRef.of(files["b"])
    assert merging.ModelMergeSimple(ModelRecipe(a), ModelRecipe(b), 1.0, ctx=Ctx()) == ModelRecipe(a)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "l.safetensors").write_bytes(files["lora"].read_bytes())
    ctx = Ctx(Folders(tmp_path, tmp_path, tmp_path))
    merged = merging.ModelMergeSimple(ModelRecipe(a), ModelRecipe(b), 0.5, ctx=ctx)
    model, _ = loaders.LoadLoRA(merged, ClipRecipe(a), "l.safetensors", 1.0, 0.0, ctx=ctx)
    assert len(model.patches) == 2


def test_comfyui_api_merge_workflows_import_and_export_with_comfyui_input_names():
    from nodes.comfy_export import to_comfy_api
    from nodes.comfy_import import workflow_from_comfy
    from sd.merge.rules import SD1_BLOCKS

    data = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
        # an API file lists every input (ComfyUI refuses one that does not): 1.0 for the blocks not varied
        "3": {"class_type": "ModelMergeSD1", "inputs": {"model1": ["1", 0], "model2": ["2", 0],
                                                        **{block: 1.0 for block in SD1_BLOCKS},
                                                        "input_blocks.4.": 0.25, "out.": 0.5,
                                                        "time_embed.": 0.75}},
        "4": {"class_type": "HypernetworkLoader", "inputs": {"model": ["3", 0], "hypernetwork_name": "h.pt",
                                                             "strength": 0.5}},
        "5": {"class_type": "CheckpointSave", "inputs": {"model": ["4", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "filename_prefix": "checkpoints/x"}},
    }
    workflow = workflow_from_comfy(data)
    merge = next(n for n in workflow.nodes.values() if n.type == "ModelMergeSD1")
    assert [merge.inputs[k] for k in ("input_blocks_4", "out", "time_embed")] == [0.25, 0.5, 0.75]
    exported = to_comfy_api(workflow)
    back = next(n for n in exported.values() if n["class_type"] == "ModelMergeSD1")
    assert back["inputs"]["input_blocks.4."] == 0.25 and "input_blocks_4" not in back["inputs"]
