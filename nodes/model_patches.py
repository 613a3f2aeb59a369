"""Model patches that change how a model is sampled, not its weights: ModelSamplingDiscrete."""

from __future__ import annotations

from dataclasses import replace

from graph import MODEL, Boolean, Choice, node
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
