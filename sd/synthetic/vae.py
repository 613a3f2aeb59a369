"""Random VAE weights in the real LDM key layout (PyTorch layout, convs OIHW), for tests and benchmarks.

Keys are written out from the LDM structure here, not read off our MLX module, so a test that loads them
also checks that sd/models/vae.py names its parameters like real checkpoints do.
"""

from __future__ import annotations

import numpy as np

from sd.models.vae import VAEConfig

# SD1.5's structure and channel multipliers (so exactly its key set), a quarter of its widths.
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2)
SD15_VAE = VAEConfig(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2)


class _Writer:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.out: dict[str, np.ndarray] = {}

    def conv(self, key: str, out_ch: int, in_ch: int, k: int) -> None:
        # 1/sqrt(fan_in) keeps activations O(1) through many layers
        w = self.rng.standard_normal((out_ch, in_ch, k, k)) / np.sqrt(in_ch * k * k)
        self.out[f"{key}.weight"] = w.astype(np.float32)
        self.out[f"{key}.bias"] = (0.05 * self.rng.standard_normal(out_ch)).astype(np.float32)

    def norm(self, key: str, ch: int) -> None:
        self.out[f"{key}.weight"] = (1 + 0.1 * self.rng.standard_normal(ch)).astype(np.float32)
        self.out[f"{key}.bias"] = (0.1 * self.rng.standard_normal(ch)).astype(np.float32)

    def resnet(self, key: str, in_ch: int, out_ch: int) -> None:
        self.norm(f"{key}.norm1", in_ch)
        self.conv(f"{key}.conv1", out_ch, in_ch, 3)
        self.norm(f"{key}.norm2", out_ch)
        self.conv(f"{key}.conv2", out_ch, out_ch, 3)
        if in_ch != out_ch:
            self.conv(f"{key}.nin_shortcut", out_ch, in_ch, 1)

    def mid(self, key: str, ch: int) -> None:
        self.resnet(f"{key}.block_1", ch, ch)
        self.norm(f"{key}.attn_1.norm", ch)
        for name in ("q", "k", "v", "proj_out"):
            self.conv(f"{key}.attn_1.{name}", ch, ch, 1)
        self.resnet(f"{key}.block_2", ch, ch)


def random_vae_weights(config: VAEConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{key without 'first_stage_model.': float32 array in PyTorch layout} for an LDM VAE of this config."""
    w = _Writer(rng)
    chans = [config.base_channels * m for m in config.channel_mult]
    levels = len(chans)

    w.conv("encoder.conv_in", config.base_channels, config.in_channels, 3)
    block_in = config.base_channels
    for i, ch in enumerate(chans):
        for j in range(config.num_res_blocks):
            w.resnet(f"encoder.down.{i}.block.{j}", block_in, ch)
            block_in = ch
        if i != levels - 1:
            w.conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3)
    w.mid("encoder.mid", block_in)
    w.norm("encoder.norm_out", block_in)
    w.conv("encoder.conv_out", 2 * config.z_channels, block_in, 3)

    w.conv("decoder.conv_in", chans[-1], config.z_channels, 3)
    w.mid("decoder.mid", chans[-1])
    block_in = chans[-1]
    for i in reversed(range(levels)):
        for j in range(config.num_res_blocks + 1):
            w.resnet(f"decoder.up.{i}.block.{j}", block_in, chans[i])
            block_in = chans[i]
        if i != 0:
            w.conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    w.norm("decoder.norm_out", block_in)
    w.conv("decoder.conv_out", config.out_channels, block_in, 3)

    w.conv("quant_conv", 2 * config.embed_dim, 2 * config.z_channels, 1)
    w.conv("post_quant_conv", config.z_channels, config.embed_dim, 1)
    return w.out
