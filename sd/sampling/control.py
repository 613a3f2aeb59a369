"""A ControlNet applied to conditioning entries (ComfyUI's `comfy.controlnet.ControlNet` object): an *extras
source* (sd/sampling/conds.py) that runs the ControlNet once per UNet call and hands its residuals over.

As ComfyUI's `get_control`: the chain's earlier ControlNets (`previous`) are asked first; outside
[start_percent, end_percent] of the schedule this one adds nothing; the hint image is cropped to the latent's
aspect and resized (nearest-exact) to the latent size x 8 once per shape, then repeated to the call's batch
(`broadcast_image_to`); the ControlNet sees the scaled input and integer timestep the UNet sees; its residuals
are multiplied by the strength (averaged over space first for `global_average_pooling`, the shuffle models),
cast to the input's dtype and added to the previous ones (`control_merge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from sd.image.resize import center_crop_to_aspect, resize
from sd.models.unet_extras import NO_EXTRAS, ControlResiduals, UNetExtras
from sd.sampling.conds import percent_to_sigma

COMPRESSION = 8  # pixels per latent cell


def broadcast_hint(hint: mx.array, batch: int, chunks: int) -> mx.array:
    """ComfyUI's broadcast_image_to: a hint batch spread over each of `chunks` equal parts of the call."""
    if hint.shape[0] == 1:
        return mx.broadcast_to(hint, (batch,) + hint.shape[1:])
    per_chunk = batch // chunks
    hint = hint[:per_chunk]
    if per_chunk > hint.shape[0]:
        reps = [hint] * (per_chunk // hint.shape[0]) + [hint[:per_chunk % hint.shape[0]]]
        hint = mx.concatenate(reps, axis=0)
    return hint if hint.shape[0] == batch else mx.concatenate([hint] * chunks, axis=0)


@dataclass(eq=False)
class ControlSource:
    """`model(x, timesteps, context, hint) -> ControlResiduals`; hint [B,H,W,C] in [0, 1]. With `adapter`
    (a T2I-Adapter, ComfyUI's T2IAdapter object) `model(hint)`, run once per hint size and batch (it sees
    neither x nor the timestep); a 1-channel adapter gets the hint's channel mean."""

    model: object
    hint: mx.array
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlSource | None = None
    global_average_pooling: bool = False
    adapter: bool = False
    adapter_channels: int = 3
    expects: tuple[int, int] | None = None  # (latent channels, text-encoding width) a ControlNet was made for
    name: str = "the ControlNet"
    _sized: dict = field(default_factory=dict)
    _features: dict = field(default_factory=dict)

    def residuals(self, x: mx.array, timestep: mx.array, context: mx.array, chunks: int, sigma: float,
                  model_sampling) -> ControlResiduals | None:
        prev = (self.previous.residuals(x, timestep, context, chunks, sigma, model_sampling)
                if self.previous is not None else None)
        start = percent_to_sigma(model_sampling, self.start_percent)
        end = percent_to_sigma(model_sampling, self.end_percent)
        if sigma > start or sigma < end:
            return prev
        if self.expects is not None and (x.shape[-1], context.shape[-1]) != self.expects:
            raise ValueError(f"{self.name} was made for {self.expects[0]}-channel latents and text encodings "
                             f"{self.expects[1]} wide; this model samples {x.shape[-1]}-channel latents with "
                             f"encodings {context.shape[-1]} wide (another model family)")
        hint = self._hint(x.shape, chunks)
        if self.adapter:
            key = (x.shape, chunks)
            if key not in self._features:
                if self.adapter_channels == 1 and hint.shape[-1] > 1:
                    hint = mx.mean(hint, axis=-1, keepdims=True)
                self._features = {key: self.model(hint)}
            out = self._features[key]
        else:
            out = self.model(x, timestep, context, hint)
        scale = self._scaled
        out = ControlResiduals(tuple(scale(r, x.dtype) for r in out.input), scale(out.middle, x.dtype),
                               tuple(scale(r, x.dtype) for r in out.output))
        return out if prev is None else prev.plus(out)

    def _scaled(self, r: mx.array | None, dtype) -> mx.array | None:
        if r is None:
            return None
        if self.global_average_pooling:
            r = mx.broadcast_to(mx.mean(r, axis=(1, 2), keepdims=True), r.shape)
        return (r * self.strength).astype(dtype)

    def _hint(self, shape: tuple[int, ...], chunks: int) -> mx.array:
        key = (shape[0], shape[1], shape[2], chunks)
        if key not in self._sized:
            height, width = shape[1] * COMPRESSION, shape[2] * COMPRESSION
            hint = self.hint
            if hint.shape[1:3] != (height, width):
                hint = resize(center_crop_to_aspect(hint, width, height), height, width, "nearest-exact")
            self._sized = {key: broadcast_hint(hint, shape[0], chunks)}  # one shape at a time, as ComfyUI
        return self._sized[key]

    def unet_extras_at(self, x: mx.array, timestep: mx.array, context: mx.array, areas: list, *, sigma: float,
                       model_sampling) -> UNetExtras:
        control = self.residuals(x, timestep, context, len(areas), sigma, model_sampling)
        return NO_EXTRAS if control is None else UNetExtras(control=control)
