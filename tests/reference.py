"""diffusers / transformers models built from the same LDM single-file checkpoint (no hub access).

diffusers' `convert_ldm_*_checkpoint` functions map the LDM keys onto diffusers modules; the configs mirror
what sdgraph detects from the same file. The parity tests import this as `reference` (pytest puts tests/ on
sys.path); `bench/` imports it as `tests.reference` (run from the repo root, `tests` is a namespace package).
"""

from __future__ import annotations

import torch

from sd.models.clip import CLIPTextConfig
from sd.models.unet import UNetConfig
from sd.models.vae import VAEConfig


def read_state(path) -> dict[str, torch.Tensor]:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    return loaded.get("state_dict", loaded)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """diffusers' UNet2DConditionModel arguments mirroring our detected config."""
    levels = range(len(cfg.channel_mult))
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(m * cfg.model_channels for m in cfg.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D"
                               for lv in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if lv in cfg.attention_levels else "UpBlock2D"
                             for lv in reversed(levels)),
        layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=cfg.transformer_depth,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' SD1 configs put the head *count* here
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
    )


def diffusers_unet(cfg: UNetConfig, state: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = UNet2DConditionModel(**diffusers_unet_config(cfg))
    converted = convert_ldm_unet_checkpoint(state, model.config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return model.eval()


def diffusers_vae(cfg: VAEConfig, state: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(cfg.channel_mult)
    config = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.embed_dim, norm_num_groups=32,
    )
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    return model.eval()


def transformers_clip(cfg: CLIPTextConfig, state: dict):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    hf = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.intermediate,
                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  max_position_embeddings=cfg.max_positions, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(hf)
    converted = convert_ldm_clip_checkpoint(state)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 drops the level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model.eval()



def diffusers_controlnet(cfg: UNetConfig, hint_channels: tuple[int, ...], ldm: dict):
    """diffusers' ControlNetModel from LDM ControlNet keys (prefix-free; numpy or torch values), converted by
    diffusers' single-file converter. `hint_channels`: the hint block's channels (sd.synthetic.controlnet)."""
    import numpy as np
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = {"control_model." + k: torch.from_numpy(np.array(v)) if not torch.is_tensor(v) else v
             for k, v in ldm.items()}
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": cfg.num_res_blocks})
    unet_args = diffusers_unet_config(cfg)
    model = ControlNetModel(
        in_channels=cfg.in_channels, block_out_channels=unet_args["block_out_channels"],
        down_block_types=unet_args["down_block_types"], layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=cfg.transformer_depth, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
        use_linear_projection=False, conditioning_embedding_out_channels=tuple(hint_channels[1::2]))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return model.eval()
