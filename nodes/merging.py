"""Model merging (ComfyUI's advanced/model_merging nodes) and CheckpointSave.

A merge loads nothing: it appends a MergePatch (the other recipe plus the strengths rule of sd/merge/rules.py)
to model1's recipe, so merges chain with LoRAs in any order, branches share the base weights, and the weights
are built once, on first use, by nodes/models.py. Shapes are compared here, from the files' headers, so a
merge of models whose layers differ (an inpainting UNet's 9-channel input conv) says what it keeps.
"""

from __future__ import annotations

import inspect
import json

from graph import CLIP, MODEL, VAE, Float, String, node
from nodes import models
from nodes.images import MAX_NAME_TRIES, next_counter, output_location, save_folder
from nodes.paths import check_writable_folder, os_error_message
from nodes.values import ClipRecipe, MergePatch, ModelRecipe
from sd.merge import rules

RATIO = Float(0.0, 1.0)
MULTIPLIER = Float(-10.0, 10.0)
# ModelMergeSD1's inputs: ComfyUI names them by the key prefix ("input_blocks.0."); ours drop the dots
# (nodes/comfy_table.py renames) and map back to the prefixes here.
SD1_INPUTS = {prefix.rstrip(".").replace(".", "_"): prefix for prefix in rules.SD1_BLOCKS}


def _shapes(recipe: ModelRecipe | ClipRecipe, part: str) -> dict[str, tuple[int, ...]]:
    """Prefix-stripped name -> shape of the component in the recipe's checkpoint, from the header only
    (patches never change shapes)."""
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.checkpoint import split_components

    tensors = open_tensors(recipe.checkpoint.path)
    return {name: tuple(tensors.shape(key)) for name, key in split_components(tensors.keys())[part].items()}


def _report(ctx, first, second, part: str, rule: rules.MergeRule) -> None:
    """Log what the merge cannot merge: weights of other shapes are kept (ComfyUI: "WEIGHT NOT MERGED")."""
    mine, theirs = _shapes(first, part), _shapes(second, part)
    common = [n for n in mine if n in theirs and rule.strengths(n) is not None]
    if not common:
        ctx.log(f"warning: {second.checkpoint.name} shares no {part} weights with {first.checkpoint.name}: "
                "the merge changes nothing but the scale")
        return
    differing = [n for n in common if mine[n] != theirs[n]]
    for name in differing[:5]:
        scale = rule.strengths(name)[1]
        kept = f"{first.checkpoint.name}'s" + (f" times {scale:g}" if scale != 1.0 else "")
        ctx.log(f"warning: {name} is {mine[name]} in {first.checkpoint.name} but {theirs[name]} in "
                f"{second.checkpoint.name}: not merged, {kept} kept, as ComfyUI does")
    if len(differing) > 5:
        ctx.log(f"warning: {len(differing) - 5} more weights of different shapes not merged")


def _merge_models(ctx, model1: ModelRecipe, model2: ModelRecipe, rule: rules.MergeRule) -> ModelRecipe:
    _report(ctx, model1, model2, "unet", rule)
    return model1.with_patch(MergePatch(model2, rule))


def _merge_clips(ctx, clip1: ClipRecipe, clip2: ClipRecipe, rule: rules.MergeRule) -> ClipRecipe:
    _report(ctx, clip1, clip2, "clip", rule)
    return clip1.with_patch(MergePatch(clip2, rule))


@node(category="advanced/model_merging", outputs=(MODEL,))
def ModelMergeSimple(model1: MODEL, model2: MODEL, ratio: RATIO = 1.0, ctx=None):
    """Blend two models' UNets: ratio * model1 + (1 - ratio) * model2 (ComfyUI's ModelMergeSimple).

    model2's weights come with its own LoRAs and merges applied; model1's hypernetworks stay."""
    return _merge_models(ctx, model1, model2, rules.simple(ratio))


@node(category="advanced/model_merging", outputs=(MODEL,))
def ModelMergeBlocks(model1: MODEL, model2: MODEL, input: RATIO = 1.0, middle: RATIO = 1.0,  # noqa: A002
                     out: RATIO = 1.0, ctx=None):
    """ModelMergeSimple with a ratio per part of the UNet: input blocks, middle block, output blocks
    (other weights, such as the time embedding, take the input ratio, as in ComfyUI)."""
    return _merge_models(ctx, model1, model2, rules.blocks({"input": input, "middle": middle, "out": out}))


@node(category="advanced/model_merging", outputs=(MODEL,))
def ModelMergeSubtract(model1: MODEL, model2: MODEL, multiplier: MULTIPLIER = 1.0, ctx=None):
    """multiplier * (model1 - model2), weight by weight (ComfyUI's ModelMergeSubtract).

    The difference of two UNets, e.g. a fine-tune minus its base for "add difference"."""
    return _merge_models(ctx, model1, model2, rules.subtract(multiplier))


@node(category="advanced/model_merging", outputs=(MODEL,))
def ModelMergeAdd(model1: MODEL, model2: MODEL, ctx=None):
    """model1 + model2, weight by weight (ComfyUI's ModelMergeAdd). With ModelMergeSubtract, "add
    difference": inpainting model + (fine-tune - base) keeps the inpainting model's 9-channel input conv."""
    return _merge_models(ctx, model1, model2, rules.add())


@node(category="advanced/model_merging", outputs=(CLIP,))
def CLIPMergeSimple(clip1: CLIP, clip2: CLIP, ratio: RATIO = 1.0, ctx=None):
    """Blend two text encoders: ratio * clip1 + (1 - ratio) * clip2 (position_ids and logit_scale are
    left alone); clip1's clip skip stays."""
    return _merge_clips(ctx, clip1, clip2, rules.simple(ratio, clip=True))


@node(category="advanced/model_merging", outputs=(CLIP,))
def CLIPMergeSubtract(clip1: CLIP, clip2: CLIP, multiplier: MULTIPLIER = 1.0, ctx=None):
    """multiplier * (clip1 - clip2), weight by weight (ComfyUI's CLIPMergeSubtract)."""
    return _merge_clips(ctx, clip1, clip2, rules.subtract(multiplier, clip=True))


@node(category="advanced/model_merging", outputs=(CLIP,))
def CLIPMergeAdd(clip1: CLIP, clip2: CLIP, ctx=None):
    """clip1 + clip2, weight by weight (ComfyUI's CLIPMergeAdd)."""
    return _merge_clips(ctx, clip1, clip2, rules.add(clip=True))


def _merge_sd1(model1, model2, ctx=None, **ratios):
    """ModelMergeSimple with a ratio per SD1 block: time_embed, label_emb, input_blocks 0-11, middle_block
    0-2, output_blocks 0-11, out (ComfyUI's ModelMergeSD1; its inputs are named "input_blocks.0." etc.)."""
    rule = rules.blocks({prefix: ratios.get(name, 1.0) for name, prefix in SD1_INPUTS.items()})
    return _merge_models(ctx, model1, model2, rule)


_P = inspect.Parameter
_merge_sd1.__signature__ = inspect.Signature(
    [_P("model1", _P.POSITIONAL_OR_KEYWORD, annotation=MODEL), _P("model2", _P.POSITIONAL_OR_KEYWORD,
                                                                  annotation=MODEL)]
    + [_P(name, _P.KEYWORD_ONLY, default=1.0, annotation=RATIO) for name in SD1_INPUTS]
    + [_P("ctx", _P.KEYWORD_ONLY, default=None)])
ModelMergeSD1 = node(name="ModelMergeSD1", category="advanced/model_merging/model_specific",
                     outputs=(MODEL,))(_merge_sd1)


@node(category="advanced/model_merging", output=True, writes_files={"filename_prefix": save_folder})
def CheckpointSave(model: MODEL, clip: CLIP, vae: VAE, filename_prefix: String() = "checkpoints/ComfyUI",
                   ctx=None):
    """Save MODEL, CLIP and VAE (their weights with every LoRA and merge applied) as one LDM-layout
    checkpoint, output/{prefix}_{counter:05}_.safetensors, atomically and never overwriting (ComfyUI's
    CheckpointSave). Hypernetworks are attention patches, not weights: they are not saved, as in ComfyUI."""
    from sd.loading.export import save_checkpoint

    unet = models.unet_for(ModelRecipe(model.checkpoint, model.weight_patches), ctx.log)
    text_encoder = models.clip_for(clip, ctx.log)
    autoencoder = models.vae_for(vae, ctx.log)
    metadata = {"format": "pt", "modelspec.predict_key": "epsilon"}
    if ctx.run_info.get("workflow"):
        metadata["sdgraph_workflow"] = json.dumps(ctx.run_info["workflow"])
    folder, name = output_location(ctx.output_dir, filename_prefix)
    fix = "point --output-dir (or filename_prefix) at a folder you may write in"
    try:
        check_writable_folder(folder, "output folder", "--output-dir")
        folder.mkdir(parents=True, exist_ok=True)
        counter = next_counter(folder, name, ".safetensors")
    except (ValueError, OSError) as e:
        raise OSError(str(e) if isinstance(e, ValueError) else os_error_message(e, folder, fix)) from None
    for _ in range(MAX_NAME_TRIES):
        target = folder / f"{name}_{counter:05}_.safetensors"
        try:
            with ctx.output_file(target, overwrite=False) as tmp:
                save_checkpoint(tmp, unet, text_encoder, autoencoder, metadata)
            ctx.log(f"saved {target}")
            return
        except FileExistsError:
            counter += 1
        except OSError as e:
            raise OSError(os_error_message(e, target, fix)) from None
    raise OSError(f"no free file name for {folder / name}_NNNNN_.safetensors after {MAX_NAME_TRIES} tries")
