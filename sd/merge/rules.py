"""Which weights ComfyUI's merge nodes touch, and with which strengths (comfy_extras/nodes_model_merging.py).

Every merge node clones model1 and adds model2's weights as patches, `add_patches(patch, strength_patch,
strength_model)`, so that a weight becomes W1 * strength_model + W2 * strength_patch:

    ModelMergeSimple / CLIPMergeSimple (ratio)     (1 - ratio, ratio): ratio * W1 + (1 - ratio) * W2
    ModelMergeSubtract / CLIPMergeSubtract (m)     (-m, m):            m * (W1 - W2)
    ModelMergeAdd / CLIPMergeAdd                   (1, 1):             W1 + W2
    ModelMergeBlocks / ModelMergeSD1 (ratios)      as Simple, with the ratio of the longest argument name
                                                   the weight's name starts with; none matching: the first

The CLIP nodes skip `position_ids` and `logit_scale`. Names are prefix-stripped parameter names
(`input_blocks.0.0.weight`, `text_model.encoder.layers.0.mlp.fc1.weight`), which are ComfyUI's UNet keys
without `diffusion_model.`.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP_SKIPPED = (".position_ids", ".logit_scale")

# ModelMergeSD1's inputs, in ComfyUI's order (SD1 and SD2 share the block layout).
SD1_BLOCKS = ("time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(12)),
              *(f"middle_block.{i}." for i in range(3)), *(f"output_blocks.{i}." for i in range(12)), "out.")
UNET_BLOCKS = ("input", "middle", "out")  # ModelMergeBlocks' inputs


@dataclass(frozen=True)
class MergeRule:
    """(strength_patch, strength_model) per weight name. With `block_ratios` ((prefix, ratio), ...), the
    longest prefix a name starts with picks its ratio, else the first entry's ratio (ComfyUI's default_ratio),
    and the strengths are (1 - ratio, ratio). Names ending in `skip_suffixes` are not merged at all."""

    strength_patch: float = 1.0
    strength_model: float = 1.0
    block_ratios: tuple[tuple[str, float], ...] = ()
    skip_suffixes: tuple[str, ...] = ()

    def strengths(self, name: str) -> tuple[float, float] | None:
        if self.skip_suffixes and name.endswith(self.skip_suffixes):
            return None
        if not self.block_ratios:
            return self.strength_patch, self.strength_model
        ratio, longest = self.block_ratios[0][1], 0
        for prefix, r in self.block_ratios:
            if name.startswith(prefix) and len(prefix) > longest:
                ratio, longest = r, len(prefix)
        return 1.0 - ratio, ratio

    @property
    def is_identity(self) -> bool:
        """True when every weight stays model1's (e.g. ratio 1): the merge can be left out of the recipe."""
        if self.block_ratios:
            return all(r == 1.0 for _, r in self.block_ratios)
        return self.strength_patch == 0.0 and self.strength_model == 1.0


def simple(ratio: float, clip: bool = False) -> MergeRule:
    return MergeRule(1.0 - ratio, ratio, skip_suffixes=CLIP_SKIPPED if clip else ())


def subtract(multiplier: float, clip: bool = False) -> MergeRule:
    return MergeRule(-multiplier, multiplier, skip_suffixes=CLIP_SKIPPED if clip else ())


def add(clip: bool = False) -> MergeRule:
    return MergeRule(1.0, 1.0, skip_suffixes=CLIP_SKIPPED if clip else ())


def blocks(ratios: dict[str, float]) -> MergeRule:
    """ModelMergeBlocks / ModelMergeSD1: `ratios` by argument name, in the node's input order."""
    return MergeRule(block_ratios=tuple((prefix, float(r)) for prefix, r in ratios.items()))
