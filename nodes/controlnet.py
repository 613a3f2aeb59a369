"""ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced (ComfyUI's nodes.py) and
Canny (comfy_extras/nodes_canny.py).

A CONTROL_NET is a recipe (the file, and for a diff ControlNet the MODEL whose UNet weights it adds); the
apply nodes store a `ControlRecipe` under the conditioning option "control", chained to the entry's previous
one (ComfyUI's `previous_controlnet`). When a sampler runs, the resolver registered here turns each recipe
into an sd.sampling.control.ControlSource with the loaded, accelerated model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from graph import CONDITIONING, IMAGE, MODEL, VAE, Float, String, node, socket_type
from nodes import models
from nodes.paths import resolve_controlnet
from nodes.sampling import register_entry_resolver
from nodes.values import FileRef, ModelRecipe, register_option_codec

CONTROL_NET = socket_type("CONTROL_NET")


@dataclass(frozen=True)
class ControlNetRecipe:
    """CONTROL_NET: a ControlNet or T2I-Adapter file; `diff_model`: the MODEL a diff ControlNet is relative
    to."""

    file: FileRef
    diff_model: ModelRecipe | None = None

    @property
    def global_average_pooling(self) -> bool:
        # ComfyUI's rule (comfy/controlnet.py load_controlnet): the shuffle models pool their residuals
        stem = self.file.path.stem
        return stem.endswith("_shuffle") or stem.endswith("_shuffle_fp16")


@dataclass(frozen=True, eq=False)
class ControlRecipe:
    """The conditioning option "control": a ControlNet with its hint, strength and range, after `previous`.
    Equal by value (the hint by a hash of its pixels), so the positive and negative entries of one apply
    share one source and one UNet call, also after a trip through the disk cache."""

    net: ControlNetRecipe
    hint: mx.array  # [B, H, W, C] in [0, 1]
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlRecipe | None = None

    @property
    def key(self) -> tuple:
        if "_key" not in self.__dict__:
            digest = hashlib.sha256(np.array(self.hint).tobytes()).hexdigest()
            object.__setattr__(self, "_key", (self.net, digest, tuple(self.hint.shape), self.strength,
                                              self.start_percent, self.end_percent,
                                              None if self.previous is None else self.previous.key))
        return self.__dict__["_key"]

    def __eq__(self, other) -> bool:
        return isinstance(other, ControlRecipe) and (other is self or other.key == self.key)

    def __hash__(self) -> int:
        return hash(self.key)


def _encode_control(recipe: ControlRecipe) -> tuple[list, dict]:
    """The chain as JSON (first ControlNet first) and its hints; a diff ControlNet (holding a MODEL) has
    no disk form."""
    links, arrays, r = [], {}, recipe
    while r is not None:
        if r.net.diff_model is not None:
            raise ValueError("a diff ControlNet's conditioning holds a MODEL and stays in memory")
        arrays[f"hint{len(links)}"] = r.hint
        links.append({"path": str(r.net.file.path), "identity": r.net.file.identity, "strength": r.strength,
                      "start": r.start_percent, "end": r.end_percent})
        r = r.previous
    return links[::-1], {f"hint{len(links) - 1 - int(k[4:])}": v for k, v in arrays.items()}


def _decode_control(links: list, arrays: dict) -> ControlRecipe:
    recipe = None
    for i, link in enumerate(links):
        net = ControlNetRecipe(FileRef(Path(link["path"]), link["identity"]))
        recipe = ControlRecipe(net, arrays[f"hint{i}"], link["strength"], link["start"], link["end"], recipe)
    return recipe


register_option_codec("control", _encode_control, _decode_control)


def control_source(recipe: ControlRecipe, ctx):
    from sd.models.t2i_adapter import T2IAdapter
    from sd.sampling.control import ControlSource

    model = models.controlnet_for(recipe.net, ctx.log)
    previous = None if recipe.previous is None else control_source(recipe.previous, ctx)
    if isinstance(model, T2IAdapter):  # runs once per hint size: nothing to accelerate
        return ControlSource(model, recipe.hint, recipe.strength, recipe.start_percent, recipe.end_percent,
                             previous, adapter=True, adapter_channels=model.config.hint_channels)
    unet = model.control_config.unet
    return ControlSource(models.fast_controlnet(model), recipe.hint, recipe.strength, recipe.start_percent,
                         recipe.end_percent, previous, recipe.net.global_average_pooling,
                         expects=(unet.in_channels, unet.context_dim), name=recipe.net.file.name)


register_entry_resolver("control", control_source)


def _inspect(ref: FileRef, ctx) -> None:
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.controlnet_file import check_kind

    check_kind(ref.path, list(open_tensors(ref.path)))  # the header only: a wrong file fails here


@node(category="loaders", outputs=(CONTROL_NET,), reads_files={"control_net_name": resolve_controlnet})
def ControlNetLoader(control_net_name: String(), ctx=None):
    """Load a ControlNet or T2I-Adapter from models/controlnet: ControlNets in the LDM layout
    (`control_model.*`, or without the prefix) or diffusers' ControlNetModel layout; T2I-Adapters (full and
    light, TencentARC's or diffusers' names); `.safetensors` or `.pth`/`.ckpt` (read safely). Sizes come
    from the file's shapes."""
    ref = FileRef.of(resolve_controlnet(control_net_name, ctx.folders), ctx.fingerprint)
    _inspect(ref, ctx)
    return ControlNetRecipe(ref)


@node(category="loaders", outputs=(CONTROL_NET,), reads_files={"control_net_name": resolve_controlnet})
def DiffControlNetLoader(model: MODEL, control_net_name: String(), ctx=None):
    """Load a ControlNet whose file holds differences from a UNet's weights (a `difference` key): the model's
    UNet weights (with its LoRAs) are added to every layer the UNet also has. An ordinary ControlNet loads
    as ControlNetLoader loads it."""
    ref = FileRef.of(resolve_controlnet(control_net_name, ctx.folders), ctx.fingerprint)
    _inspect(ref, ctx)
    return ControlNetRecipe(ref, model)


def _hint(image: mx.array) -> mx.array:
    return image[..., :3].astype(mx.float32)


@node(category="conditioning/controlnet", outputs=(CONDITIONING,))
def ControlNetApply(conditioning: CONDITIONING, control_net: CONTROL_NET, image: IMAGE,
                    strength: Float(0.0, 10.0) = 1.0):
    """Guide a conditioning with a ControlNet and a hint image (ComfyUI's deprecated "Apply ControlNet
    (OLD)"): over the whole schedule, after any ControlNet the entries already carry. As in ComfyUI, when
    the negative carries no ControlNet the sampler gives it this one too (control_apply_to_uncond).
    Strength 0 returns the conditioning unchanged."""
    if strength == 0:
        return conditioning
    hint = _hint(image)
    return conditioning.map(lambda e: e.with_options(control=ControlRecipe(
        control_net, hint, strength, previous=e.options.get("control")), control_apply_to_uncond=True))


@node(category="conditioning/controlnet", outputs=(CONDITIONING, CONDITIONING),
      output_names=("positive", "negative"))
def ControlNetApplyAdvanced(positive: CONDITIONING, negative: CONDITIONING, control_net: CONTROL_NET,
                            image: IMAGE, strength: Float(0.0, 10.0) = 1.0,
                            start_percent: Float(0.0, 1.0) = 0.0, end_percent: Float(0.0, 1.0) = 1.0,
                            vae: VAE = None):
    """Guide positive and negative with a ControlNet and a hint image between start_percent and end_percent
    of the schedule ("Apply ControlNet"). Several chain: their residuals add up. Strength 0 returns both
    unchanged. vae is accepted for ComfyUI's workflows and unused: it serves ControlNets that take latent
    hints (SD3/Flux), which SD1.5's do not."""
    if strength == 0:
        return positive, negative
    hint = _hint(image)
    made: dict = {}  # one recipe per previous ControlNet, shared by both sides

    def apply(entry):
        prev = entry.options.get("control")
        key = None if prev is None else prev.key
        if key not in made:
            made[key] = ControlRecipe(control_net, hint, strength, start_percent, end_percent, prev)
        return entry.with_options(control=made[key], control_apply_to_uncond=False)

    return positive.map(apply), negative.map(apply)


@node(category="image/preprocessors", outputs=(IMAGE,))
def Canny(image: IMAGE, low_threshold: Float(0.01, 0.99) = 0.4, high_threshold: Float(0.01, 0.99) = 0.8):
    """Canny edges of images, white on black, as ComfyUI's Canny (kornia's algorithm: 5x5 Gaussian blur,
    Sobel gradients, non-maximum suppression, hysteresis between the two thresholds; the thresholds are in
    units of the unnormalised Sobel magnitude)."""
    import numpy as np

    from sd.image.canny import canny

    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold {low_threshold} is above high_threshold {high_threshold}")
    edges = canny(np.array(image.astype(mx.float32)), low_threshold, high_threshold)
    return mx.repeat(mx.array(edges)[..., None], 3, axis=-1)


def _loader_estimate(lit, inputs, files):
    from graph.memory_plan import Estimate

    path = files.get("control_net_name")
    return Estimate(held=path.stat().st_size if path is not None else 0, outputs=(None,),
                    detail="the ControlNet's weights")


def _canny_estimate(lit, inputs, files):
    from graph.memory_plan import Estimate

    size = inputs.get("image")
    if not (isinstance(size, tuple) and size[:1] == ("image",)):
        return Estimate()
    _, b, h, w = size
    return Estimate(held=b * h * w * 3 * 4, working=b * h * w * 4 * 16, outputs=(size,),
                    detail=f"{b} edge map(s) of {w}x{h} pixels and the gradients")


def _register_estimates() -> None:
    from graph.memory_plan import register_estimate

    for name in ("ControlNetLoader", "DiffControlNetLoader"):
        register_estimate(name, _loader_estimate)
    register_estimate("Canny", _canny_estimate)


_register_estimates()
