"""Model patches that change how a model is sampled, not its weights: ModelSamplingDiscrete (the noise
schedule and prediction type), and the maths of RescaleCFG, FreeU_V2, SelfAttentionGuidance,
PerturbedAttentionGuidance (ComfyUI's names, inputs and defaults).

ModelSamplingDiscrete sets the recipe's `sampling`; the others append a `GuidancePatch`. Nothing is loaded or
changed. When a sampler runs, `sampling_patches(recipe, unet)` turns the recipe's guidance patches, in order,
into sd.sampling's `SamplingPatches` (sd/sampling/patches.py), fresh for that run.
"""

from __future__ import annotations

from dataclasses import replace

from graph import MODEL, Boolean, Choice, Float, node
from nodes.values import ModelRecipe, SamplingPatch
from sd.sampling.model_sampling import PREDICTIONS


@node(category="advanced/model", outputs=(MODEL,))
def ModelSamplingDiscrete(model: MODEL, sampling: Choice(PREDICTIONS) = "eps", zsnr: Boolean() = False):
    """Sample the model as eps, v_prediction, lcm or x0, optionally with zero terminal SNR (ComfyUI's
    ModelSamplingDiscrete).

    For v-prediction fine-tunes whose file does not say so, LCM LoRAs (`lcm`: the 50-timestep distilled
    schedule and LCM's boundary conditions; pair it with the lcm sampler) and zero-terminal-SNR models.
    It replaces what LoadCheckpoint detected; the weights are untouched."""
    recipe: ModelRecipe = model
    return replace(recipe, sampling=SamplingPatch(sampling, zsnr))


@node(category="advanced/model", outputs=(MODEL,))
def RescaleCFG(model: MODEL, multiplier: Float(0.0, 1.0) = 0.7):
    """Rescale the CFG result's spread to the positive prediction's (less burn at high cfg; meant for
    v-prediction / zero-terminal-SNR models). Multiplier 0 is plain CFG: the model is passed through
    unpatched (ComfyUI computes the same through the patch, up to rounding)."""
    recipe: ModelRecipe = model
    if multiplier == 0:
        return recipe
    return recipe.with_sampling_patch("RescaleCFG", multiplier=multiplier)


@node(category="model_patches/unet", outputs=(MODEL,))
def FreeU_V2(model: MODEL, b1: Float(0.0, 10.0) = 1.3, b2: Float(0.0, 10.0) = 1.4,
             s1: Float(0.0, 10.0) = 0.9, s2: Float(0.0, 10.0) = 0.2):
    """FreeU v2: amplify the UNet decoder's backbone features (b1, b2) and damp the skip connections' low
    frequencies (s1, s2) at the two deepest output levels; no training, no new weights."""
    recipe: ModelRecipe = model
    return recipe.with_sampling_patch("FreeU_V2", b1=b1, b2=b2, s1=s1, s2=s2)


@node(category="model_patches/unet", outputs=(MODEL,))
def SelfAttentionGuidance(model: MODEL, scale: Float(-2.0, 5.0) = 0.5, blur_sigma: Float(0.0, 10.0) = 2.0):
    """Self-attention guidance: guide away from a copy of the negative's prediction blurred where the middle
    block's self-attention concentrates (one extra UNet call per step; the negative is always evaluated)."""
    recipe: ModelRecipe = model
    return recipe.with_sampling_patch("SelfAttentionGuidance", scale=scale, blur_sigma=blur_sigma)


@node(category="model_patches/unet", outputs=(MODEL,))
def PerturbedAttentionGuidance(model: MODEL, scale: Float(0.0, 100.0) = 3.0):
    """Perturbed-attention guidance: guide away from the positive's prediction with the middle block's
    self-attention replaced by the identity (one extra UNet call per step)."""
    recipe: ModelRecipe = model
    return recipe.with_sampling_patch("PerturbedAttentionGuidance", scale=scale)


def sampling_patches(recipe: ModelRecipe, unet):
    """The recipe's sampling patches for one run, in the order they were applied."""
    from sd.sampling import patches as p
    from sd.sampling.guidance import NO_PATCHES

    out = NO_PATCHES
    for patch in getattr(recipe, "sampling_patches", ()):
        s = dict(patch.settings)
        if patch.kind == "RescaleCFG":
            built = p.rescale_cfg_patches(s["multiplier"])
        elif patch.kind == "FreeU_V2":
            built = p.freeu_v2_patches(unet.config.model_channels, s["b1"], s["b2"], s["s1"], s["s2"])
        elif patch.kind == "SelfAttentionGuidance":
            built = p.sag_patches(s["scale"], s["blur_sigma"])
        elif patch.kind == "PerturbedAttentionGuidance":
            built = p.pag_patches(s["scale"])
        elif patch.kind == "DifferentialDiffusion":
            continue  # the noise mask's per-step function (nodes.inpaint.denoise_mask_function), not guidance
        else:
            raise ValueError(f"unknown model patch {patch.kind!r}")
        out = out.then(built)
    return out
