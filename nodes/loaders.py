"""Loader nodes (LoadCheckpoint, CheckpointLoader, VAELoader, LoadLoRA, LoraLoaderModelOnly,
HypernetworkLoader): they resolve files and build recipes; no model weights are read here."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from graph import CLIP, MODEL, VAE, Boolean, Float, String, node
from nodes import models
from nodes.checkpoint_configs import config_clip_layer, resolve_config
from nodes.paths import checkpoint_files, resolve_checkpoint, resolve_hypernetwork, resolve_lora, resolve_vae
from nodes.values import ClipRecipe, FileRef, HypernetworkPatch, ModelRecipe, SamplingPatch, VaeRecipe

_PROBED: dict[tuple, str | None] = {}  # (path, size, mtime, kind) -> the error the header gave, or None


def probe_tensor_file(path: Path, kind: str) -> Path:
    """Read a weights file's header (cheap: no tensor data) so that `sdgraph validate` and a run's validation
    catch a truncated, corrupt or wrong-family file before anything runs. Remembered per file state."""
    from sd.errors import SDGraphError
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.detect import check_family

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, kind)
    if key not in _PROBED:
        try:
            keys = open_tensors(path).keys()
            if kind == "checkpoint":
                check_family(path, keys)
            _PROBED[key] = None
        except SDGraphError as e:
            _PROBED[key] = str(e)
        if len(_PROBED) > 256:
            _PROBED.pop(next(iter(_PROBED)))
    if _PROBED[key] is not None:
        raise ValueError(f"{kind} {_PROBED[key]}")
    return path


def checkpoint_file(name: str, folders) -> Path | list[Path]:
    """The checkpoint (with its companion .yaml, if any: nodes.paths.checkpoint_files), its header checked."""
    found = checkpoint_files(name, folders)
    probe_tensor_file(found[0] if isinstance(found, list) else found, "checkpoint")
    return found


def lora_file(name: str, folders) -> Path:
    return probe_tensor_file(resolve_lora(name, folders), "LoRA")


def vae_file(name: str, folders) -> Path:
    return probe_tensor_file(resolve_vae(name, folders), "VAE")


@node(category="loaders", outputs=(MODEL, CLIP, VAE), reads_files={"ckpt_name": checkpoint_file})
def LoadCheckpoint(ckpt_name: String(), ctx=None):
    """Load an SD1.x checkpoint from models/checkpoints (ComfyUI's CheckpointLoaderSimple).

    The outputs are recipes: each part's weights are read when a node first needs them, so a run
    whose encodings are all cached never loads the text encoder. A v-prediction (and zero-terminal-
    SNR) checkpoint is recognised by its 'v_pred'/'ztsnr' keys or a companion .yaml with
    `parameterization: "v"`, and sampled as such (ModelSamplingDiscrete overrides it)."""
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.detect import check_family
    from sd.loading.prediction import detect_sampling

    ref = FileRef.of(resolve_checkpoint(ckpt_name, ctx.folders), ctx.fingerprint)
    keys = open_tensors(ref.path).keys()
    check_family(ref.path, keys)  # header only: a wrong file fails here
    detected = detect_sampling(ref.path, keys)
    if detected.evidence:
        ctx.log(f"{ref.name}: sampled as {detected.prediction}" + (" with zero terminal SNR" if detected.zsnr
                                                                    else "") + f" ({detected.evidence})")
    model = ModelRecipe(ref, sampling=SamplingPatch(detected.prediction, detected.zsnr))
    return model, ClipRecipe(ref), VaeRecipe(ref)


@node(category="loaders", outputs=(MODEL, CLIP, VAE),
      reads_files={"config_name": resolve_config, "ckpt_name": checkpoint_file})
def CheckpointLoader(config_name: String(), ckpt_name: String(), ctx=None):
    """Load an SD1.x checkpoint and an LDM config name (ComfyUI's deprecated CheckpointLoader).

    The architecture is still read off the weights; config_name is checked, not obeyed blindly: a YAML in
    models/configs is read (safely) and one of ComfyUI's shipped configs (v1-inference.yaml, ...) is known
    by name. A config whose text encoder stops at a hidden layer (v1-inference_clip_skip_2.yaml,
    anything_v3.yaml) sets CLIP's last layer as ComfyUI does; a v-prediction or SD2.x config
    is refused, as are names that are neither: at validation, naming the node and input."""
    layer = config_clip_layer(config_name, ctx.folders)
    model, clip, vae = LoadCheckpoint(ckpt_name, ctx=ctx)
    return model, replace(clip, stop_at_layer=layer), vae


@node(category="loaders", outputs=(VAE,), reads_files={"vae_name": vae_file})
def VAELoader(vae_name: String(), ctx=None):
    """Load a standalone VAE file from models/vae (ComfyUI's VAELoader), such as vae-ft-mse-840000.

    `.safetensors` or `.ckpt`/`.pt` (read safely); LDM keys with or without 'first_stage_model.', or
    diffusers AutoencoderKL keys (old and new attention names); the architecture is read off the shapes.
    ComfyUI's "taesd"/"pixel_space" entries are not supported."""
    from sd.loading.vae_file import vae_layout

    ref = FileRef.of(resolve_vae(vae_name, ctx.folders), ctx.fingerprint)
    vae_layout(ref.path)  # header only: a file that is no VAE fails here
    return VaeRecipe(ref, source="vae_file")


def _with_lora(ctx, lora_name: str, model: ModelRecipe, clip: ClipRecipe | None, strength_model: float,
               strength_clip: float, allow_partial: bool) -> tuple[ModelRecipe, ClipRecipe | None]:
    ref = FileRef.of(resolve_lora(lora_name, ctx.folders), ctx.fingerprint)
    lora = models.load_lora_file(ref)
    parts = []
    targets = [("unet", "unet", strength_model, model)]
    if clip is not None:
        targets.append(("clip", "text_encoder", strength_clip, clip))
    for part, component, strength, recipe in targets:
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
    if clip is not None and lora.layers("text_encoder"):
        clip = clip.with_lora(ref, strength_clip, allow_partial)
    return model, clip


@node(category="loaders", outputs=(MODEL, CLIP), reads_files={"lora_name": lora_file})
def LoadLoRA(model: MODEL, clip: CLIP, lora_name: String(),
             strength_model: Float(-100.0, 100.0) = 1.0, strength_clip: Float(-100.0, 100.0) = 1.0,
             allow_partial: Boolean() = False, ctx=None):
    """Add a LoRA from models/loras to MODEL and CLIP (ComfyUI's LoraLoader).

    Nothing is merged: the LoRA is appended to the recipes as a patch, so chains stack, branches
    share the base weights, and changing a strength never reloads the checkpoint. The coverage
    (LoRA layers matched per component) is checked against the checkpoint's shapes and logged.
    A LoRA with layers that match nothing (one for SDXL or SD2) fails here, unless allow_partial."""
    return _with_lora(ctx, lora_name, model, clip, strength_model, strength_clip, allow_partial)


@node(category="loaders", outputs=(MODEL,), reads_files={"lora_name": lora_file})
def LoraLoaderModelOnly(model: MODEL, lora_name: String(), strength_model: Float(-100.0, 100.0) = 1.0,
                        allow_partial: Boolean() = False, ctx=None):
    """Add a LoRA from models/loras to MODEL only (ComfyUI's LoraLoaderModelOnly); its text-encoder layers,
    if any, are not applied. As LoadLoRA otherwise."""
    return _with_lora(ctx, lora_name, model, None, strength_model, 0.0, allow_partial)[0]


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
