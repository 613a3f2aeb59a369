"""LoadCheckpoint, LoadLoRA and HypernetworkLoader: they resolve files and build recipes; no model weights are
read here."""

from __future__ import annotations

import warnings

from graph import CLIP, MODEL, VAE, Boolean, Float, String, node
from nodes import models
from nodes.paths import resolve_checkpoint, resolve_hypernetwork, resolve_lora
from nodes.values import ClipRecipe, FileRef, HypernetworkPatch, ModelRecipe, VaeRecipe


@node(category="loaders", outputs=(MODEL, CLIP, VAE), reads_files={"ckpt_name": resolve_checkpoint})
def LoadCheckpoint(ckpt_name: String(), ctx=None):
    """Load an SD1.x checkpoint from models/checkpoints (ComfyUI's CheckpointLoaderSimple).

    The outputs are recipes: each part's weights are read when a node first needs them, so a run
    whose encodings are all cached never loads the text encoder."""
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.detect import check_family

    ref = FileRef.of(resolve_checkpoint(ckpt_name, ctx.folders), ctx.fingerprint)
    check_family(ref.path, open_tensors(ref.path).keys())  # header only: a wrong file fails here
    return ModelRecipe(ref), ClipRecipe(ref), VaeRecipe(ref)


@node(category="loaders", outputs=(MODEL, CLIP), reads_files={"lora_name": resolve_lora})
def LoadLoRA(model: MODEL, clip: CLIP, lora_name: String(),
             strength_model: Float(-100.0, 100.0) = 1.0, strength_clip: Float(-100.0, 100.0) = 1.0,
             allow_partial: Boolean() = False, ctx=None):
    """Add a LoRA from models/loras to MODEL and CLIP (ComfyUI's LoraLoader).

    Nothing is merged: the LoRA is appended to the recipes as a patch, so chains stack, branches
    share the base weights, and changing a strength never reloads the checkpoint. The coverage
    (LoRA layers matched per component) is checked against the checkpoint's shapes and logged.
    A LoRA with layers that match nothing (one for SDXL or SD2) fails here, unless allow_partial."""
    ref = FileRef.of(resolve_lora(lora_name, ctx.folders), ctx.fingerprint)
    lora = models.load_lora_file(ref)
    parts = []
    for part, component, strength, recipe in (("unet", "unet", strength_model, model),
                                              ("clip", "text_encoder", strength_clip, clip)):
        if strength != 0 and lora.layers(component):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a partial match is reported below, once
                coverage = lora.check(component, models.skeleton(part, recipe.checkpoint), allow_partial)
            parts.append(str(coverage))
            if not coverage.complete:
                ctx.log(f"warning: {len(coverage.unmatched)} layer(s) of {ref.name} match nothing in the "
                        f"{coverage} and are skipped (allow_partial)")
    ctx.log(f"LoRA {ref.name}: " + (", ".join(parts) or "no layers applied (strengths 0)"))
    # a LoRA without layers for a component leaves that recipe (and what it caches under) unchanged
    if lora.layers("unet"):
        model = model.with_lora(ref, strength_model, allow_partial)
    if lora.layers("text_encoder"):
        clip = clip.with_lora(ref, strength_clip, allow_partial)
    return model, clip


@node(category="loaders", outputs=(MODEL,), reads_files={"hypernetwork_name": resolve_hypernetwork})
def HypernetworkLoader(model: MODEL, hypernetwork_name: String(), strength: Float(-10.0, 10.0) = 1.0,
                       ctx=None):
    """Add an A1111 hypernetwork (.pt) from models/hypernetworks to MODEL (ComfyUI's HypernetworkLoader).

    Its small networks act on the k and v inputs of every UNet attention of a matching width (the text
    context in cross-attention, the image tokens in self-attention): k + net_k(k) * strength. The file is
    read through the safe unpickler and checked here; nothing in it is executed."""
    ref = FileRef.of(resolve_hypernetwork(hypernetwork_name, ctx.folders), ctx.fingerprint)
    hypernetwork = models.load_hypernetwork_file(ref)  # a malformed file fails here, naming itself
    ctx.log(f"hypernetwork {ref.name}: widths {', '.join(str(w) for w in sorted(hypernetwork.modules))}, "
            f"activation {hypernetwork.activation}" + (", layer norm" if hypernetwork.layer_norm else ""))
    return model.with_patch(HypernetworkPatch(ref, strength))
