"""What one UNet call may carry besides (x, timesteps, context): the seam for ControlNet, inpainting models,
GLIGEN and guidance patches (ComfyUI's `c_concat`, `control` and `transformer_options["patches"]`).

The UNet forward (sd/models/unet.py) exists once and reads these at fixed places:

    concat              [B, h, w, k] appended to x's channels before the first conv (inpainting models)
    control.input[i]    added to the output of input block i (i = 0 is the first conv), before it is kept as
                        skip i; `None` or a missing index adds nothing (T2I-adapter style)
    control.middle      added to the middle block's output
    control.output[i]   added to skip i when an output block takes it (ControlNet's 13 residuals: skip 0..11
                        and the middle)
    output_block_patch  fn(h, skip, site) -> (h, skip), before an output block concatenates them (FreeU)
    attn1_replace       {(block, index, depth) or (block, index): fn(q, k, v, heads, scale) -> out}: replaces
                        the self-attention softmax(q k^T) v there (SAG records it, PAG makes it the identity)
    middle_patch        fn(x, site) -> x inside every transformer block, after self-attention (GLIGEN)

A `Site` names where a patch runs with ComfyUI's block names: ("input", i), ("middle", 0), ("output", i);
`depth` is the transformer block within a SpatialTransformer and `ordinal` counts transformer blocks over
the whole UNet in execution order (ComfyUI's `transformer_index`).

Values are immutable; `merged` combines the extras of several sources (two ControlNets' residuals add up,
concat channels are appended in order, patches run in order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass(frozen=True)
class Site:
    block: str  # "input" | "middle" | "output"
    index: int
    depth: int = 0
    ordinal: int = 0


AttentionFn = Callable[[mx.array, mx.array, mx.array, int, float], mx.array]
OutputBlockPatch = Callable[[mx.array, mx.array, Site], tuple[mx.array, mx.array]]
MiddlePatch = Callable[[mx.array, Site], mx.array]


@dataclass(frozen=True)
class ControlResiduals:
    input: Sequence[mx.array | None] = ()
    middle: mx.array | None = None
    output: Sequence[mx.array | None] = ()

    def plus(self, other: ControlResiduals) -> ControlResiduals:
        def add(a, b):
            return b if a is None else a if b is None else a + b

        def add_lists(a, b):
            n = max(len(a), len(b))
            return tuple(add(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n))

        return ControlResiduals(add_lists(self.input, other.input), add(self.middle, other.middle),
                                add_lists(self.output, other.output))


def _at(seq: Sequence[mx.array | None], i: int) -> mx.array | None:
    return seq[i] if i < len(seq) else None


@dataclass(frozen=True)
class UNetExtras:
    concat: mx.array | None = None
    control: ControlResiduals | None = None
    output_block_patch: tuple[OutputBlockPatch, ...] = ()
    attn1_replace: Mapping[tuple, AttentionFn] = field(default_factory=dict)
    middle_patch: tuple[MiddlePatch, ...] = ()

    @property
    def is_empty(self) -> bool:
        return (self.concat is None and self.control is None and not self.output_block_patch
                and not self.attn1_replace and not self.middle_patch)

    @property
    def has_hooks(self) -> bool:
        """Python callables inside the forward (a compiled graph could not see a new one)."""
        return bool(self.output_block_patch or self.attn1_replace or self.middle_patch)

    def merged(self, other: UNetExtras | None) -> UNetExtras:
        if other is None or other.is_empty:
            return self
        if self.is_empty:
            return other
        concat = (other.concat if self.concat is None else self.concat if other.concat is None
                  else mx.concatenate([self.concat, other.concat], axis=-1))
        control = (other.control if self.control is None else self.control if other.control is None
                   else self.control.plus(other.control))
        return UNetExtras(concat, control, self.output_block_patch + other.output_block_patch,
                          {**self.attn1_replace, **other.attn1_replace},
                          self.middle_patch + other.middle_patch)

    # --- read by the UNet forward ---

    def add_control(self, kind: str, index: int, h: mx.array) -> mx.array:
        if self.control is None:
            return h
        residual = self.control.middle if kind == "middle" else _at(getattr(self.control, kind), index)
        return h if residual is None else h + residual.astype(h.dtype)

    def before_output_block(self, h: mx.array, skip: mx.array, index: int,
                            skip_index: int) -> tuple[mx.array, mx.array]:
        """Output block `index` is about to take skip `skip_index` (skips are taken last first)."""
        skip = self.add_control("output", skip_index, skip)
        for patch in self.output_block_patch:
            h, skip = patch(h, skip, Site("output", index))
        return h, skip


NO_EXTRAS = UNetExtras()
