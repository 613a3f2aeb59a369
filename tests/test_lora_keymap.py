"""Key map: every layer of a real kohya SD1.5 LoRA resolves onto the real checkpoint's names, and the
LDM <-> diffusers block table agrees with diffusers' own checkpoint converter on several UNet layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_testing import UNET_PREFIX, diffusers_unet_config
from sd15_keys import CHECKPOINT_KEYS, KOHYA_KEYS, read_tsv

from sd.lora.deltas import delta_shape, fits
from sd.lora.keymap import build_index, unet_diffusers_names, weight_modules
from sd.lora.reader import parse_lora
from sd.models.unet import UNetConfig
from sd.synthetic.unet import TINY_UNET, unet_shapes


def mlx_shapes(shapes: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes -> our parameter names and MLX layout (convs O, kh, kw, I)."""
    out = {}
    for key, shape in shapes.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape
    return out


def test_every_key_of_a_real_kohya_file_maps_onto_sd15():
    checkpoint = read_tsv(CHECKPOINT_KEYS)
    indexes = {"unet": build_index(mlx_shapes(checkpoint, UNET_PREFIX), "unet"),
               "text_encoder": build_index(mlx_shapes(checkpoint, "cond_stage_model.transformer."),
                                           "text_encoder")}
    tensors = {k: np.zeros(s, dtype=np.float32) for k, s in read_tsv(KOHYA_KEYS).items()}
    parsed = parse_lora(tensors, KOHYA_KEYS)
    assert not parsed.unrecognised
    matched = {"unet": set(), "text_encoder": set()}
    for layer in parsed.modules:
        index = indexes[layer.component]
        target = index.resolve(layer.name, underscored=True)
        assert target is not None, layer.key
        assert fits(delta_shape(layer), index.shapes[target]), (layer.key, target)
        matched[layer.component].add(target)
    assert (len(matched["unet"]), len(matched["text_encoder"])) == (192, 72)


LAYOUTS = {
    "tiny_sd15": TINY_UNET,
    # 3 levels, 1 res block, no attention on the first level, 2 transformer blocks per attention
    "irregular": UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                            num_res_blocks=1, attention_levels=(1, 2), transformer_depth=2, context_dim=64),
    "three_res_blocks": UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                                   num_res_blocks=3, attention_levels=(0, 1), transformer_depth=1,
                                   context_dim=32),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_block_table_agrees_with_diffusers_converter(layout):
    # imported here: the converter module costs ~2 s to import, which the quick tier should not pay
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(0)
    ldm = {UNET_PREFIX + k: torch.randn(s, generator=generator) for k, s in unet_shapes(cfg).items()}
    converted = convert_ldm_unet_checkpoint(dict(ldm), diffusers_unet_config(cfg))
    by_value = {v.numpy().tobytes(): k for k, v in converted.items()}
    expected = {}  # diffusers module name -> LDM module name, as the converter moved the weights
    for key, value in ldm.items():
        if key.endswith(".weight") and value.ndim >= 2:
            expected[by_value[value.numpy().tobytes()].removesuffix(".weight")] = \
                key[len(UNET_PREFIX):].removesuffix(".weight")
    ours = unet_diffusers_names(list(weight_modules({k[len(UNET_PREFIX):]: tuple(v.shape)
                                                     for k, v in ldm.items()})))
    assert ours == expected
