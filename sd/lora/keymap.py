"""Map LoRA module names (kohya, diffusers/PEFT, LDM spellings) onto our parameter names.

Our modules use the original LDM checkpoint names (`input_blocks.1.1.proj_in`). LoRA files name the same
layers either that way or in diffusers style (`down_blocks.0.attentions.0.proj_in`), and kohya files also
replace every dot by an underscore. We never guess where the underscores were dots: we list *our* module
names in both styles, turn each into its underscore form, and look the LoRA name up in that index.

The LDM <-> diffusers block table is derived from the parameter names (number of levels and res blocks per
level), so it works for the tiny test UNets as well as SD1.5.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# Sub-layer names inside a res block: LDM spelling -> diffusers spelling.
_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# UNet layers outside the down/mid/up blocks: LDM name -> diffusers name.
_UNET_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def torch_shape(mlx_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a weight in PyTorch layout: MLX convs are (O, H, W, I), torch convs (O, I, H, W)."""
    if len(mlx_shape) == 4:
        o, h, w, i = mlx_shape
        return (o, i, h, w)
    return tuple(mlx_shape)


def weight_modules(param_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> torch-layout weight shape, for every linear/conv layer (weights with 2+ dims)."""
    modules = {}
    for name, shape in param_shapes.items():
        if name.endswith(".weight") and len(shape) >= 2:
            modules[name[: -len(".weight")]] = torch_shape(tuple(shape))
    return modules


def _block_indices(names: list[str], group: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(group)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def _has(names: list[str], prefix: str) -> bool:
    return any(n.startswith(prefix + ".") or n == prefix for n in names)


def unet_block_table(module_names: list[str]) -> dict[str, tuple[str, bool]]:
    """LDM block prefix -> (diffusers block prefix, is_resnet), derived from the layer layout.

    input_blocks: block 0 is conv_in; then per level res blocks (`N.0`, with attention `N.1`), closed by a
    downsampler (`N.0.op`) on every level but the last. output_blocks: per level res blocks (+ attention),
    closed by an upsampler (`N.1.conv` or `N.2.conv`) on every level but the last.
    """
    table: dict[str, tuple[str, bool]] = {}
    level, res = 0, 0
    for n in _block_indices(module_names, "input_blocks"):
        if n == 0:
            continue
        if _has(module_names, f"input_blocks.{n}.0.op"):
            table[f"input_blocks.{n}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", False)
            level, res = level + 1, 0
            continue
        table[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.resnets.{res}", True)
        if _has(module_names, f"input_blocks.{n}.1"):
            table[f"input_blocks.{n}.1"] = (f"down_blocks.{level}.attentions.{res}", False)
        res += 1

    mid_resnet = 0
    for n in _block_indices(module_names, "middle_block"):
        if _has(module_names, f"middle_block.{n}.in_layers"):
            table[f"middle_block.{n}"] = (f"mid_block.resnets.{mid_resnet}", True)
            mid_resnet += 1
        else:
            table[f"middle_block.{n}"] = ("mid_block.attentions.0", False)

    level, res = 0, 0
    for n in _block_indices(module_names, "output_blocks"):
        table[f"output_blocks.{n}.0"] = (f"up_blocks.{level}.resnets.{res}", True)
        upsampler = None
        for sub in (1, 2):
            if _has(module_names, f"output_blocks.{n}.{sub}.conv"):
                upsampler = f"output_blocks.{n}.{sub}.conv"
            elif _has(module_names, f"output_blocks.{n}.{sub}"):
                table[f"output_blocks.{n}.{sub}"] = (f"up_blocks.{level}.attentions.{res}", False)
        res += 1
        if upsampler is not None:
            table[upsampler] = (f"up_blocks.{level}.upsamplers.0.conv", False)
            level, res = level + 1, 0
    return table


def unet_diffusers_names(module_names: list[str]) -> dict[str, str]:
    """Diffusers-style module name -> our (LDM) module name, for every UNet layer we can name that way."""
    table = unet_block_table(module_names)
    # Longest prefix first, so `input_blocks.3.0.op` wins over a shorter block prefix.
    prefixes = sorted(table, key=len, reverse=True)
    out = {}
    for name in module_names:
        if name in _UNET_TOP_LEVEL:
            out[_UNET_TOP_LEVEL[name]] = name
            continue
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                target, is_resnet = table[prefix]
                rest = name[len(prefix) + 1:]
                if is_resnet:
                    rest = _RESNET_RENAMES.get(rest, rest)
                out[f"{target}.{rest}" if rest else target] = name
                break
    return out


@dataclass(frozen=True)
class ModuleIndex:
    """Every name a LoRA may use for one of our layers, dotted and underscored, -> our module name."""

    shapes: Mapping[str, tuple[int, ...]]  # our module name -> torch-layout weight shape
    dotted: Mapping[str, str]
    underscored: Mapping[str, str]

    def resolve(self, lora_name: str, underscored: bool) -> str | None:
        return (self.underscored if underscored else self.dotted).get(lora_name)


def build_index(param_shapes: Mapping[str, tuple[int, ...]], component: str) -> ModuleIndex:
    """Index our layers for `component` ("unet" or "text_encoder") from the module's parameter shapes."""
    shapes = weight_modules(param_shapes)
    dotted = {name: name for name in shapes}
    if component == "unet":
        for alias, name in unet_diffusers_names(list(shapes)).items():
            dotted.setdefault(alias, name)
    underscored: dict[str, str] = {}
    ambiguous = set()
    for alias, name in dotted.items():
        key = alias.replace(".", "_")
        if underscored.get(key, name) != name:
            ambiguous.add(key)  # two different layers with the same underscore form: refuse to guess
        underscored[key] = name
    for key in ambiguous:
        del underscored[key]
    return ModuleIndex(shapes=shapes, dotted=dotted, underscored=underscored)
