"""Random ControlNet weights in the LDM layout (`control_model.` + the UNet's encoder keys,
`input_hint_block`, `zero_convs`, `middle_block_out`),
written apart from sd/models/controlnet.py as the UNet's are.

Real ControlNets start their zero convs at zero; these are random so tests see every path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd.models.unet import UNetConfig
from sd.synthetic import TensorSpec, write_safetensors, write_torch_zip
from sd.synthetic.unet import TINY_UNET, random_tensor, unet_shapes

SD15_HINT = (3, 16, 16, 32, 32, 96, 96, 256)  # cldm's input_hint_block channels (before the last conv)
TINY_HINT = (3, 16, 16, 32, 32, 32, 32, 32)


def controlnet_shapes(cfg: UNetConfig = TINY_UNET, hint: tuple[int, ...] = TINY_HINT) -> dict[str, tuple]:
    """Every LDM ControlNet key (no prefix) and its PyTorch shape."""
    shapes = {k: s for k, s in unet_shapes(cfg).items()
              if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    chans = list(hint) + [cfg.model_channels]
    for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
        shapes[f"input_hint_block.{2 * i}.weight"] = (cout, cin, 3, 3)
        shapes[f"input_hint_block.{2 * i}.bias"] = (cout,)
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")})
    for b in blocks:  # a zero conv per input block, as wide as that block's output
        width = max((s[0] for k, s in shapes.items() if k.startswith(f"input_blocks.{b}.")
                     and k.endswith(("out_layers.3.weight", "op.weight", "input_blocks.0.0.weight"))))
        shapes[f"zero_convs.{b}.0.weight"] = (width, width, 1, 1)
        shapes[f"zero_convs.{b}.0.bias"] = (width,)
    middle = shapes["middle_block.2.out_layers.3.weight"][0]
    shapes["middle_block_out.0.weight"] = (middle, middle, 1, 1)
    shapes["middle_block_out.0.bias"] = (middle,)
    return shapes


def random_controlnet(cfg: UNetConfig = TINY_UNET, hint: tuple[int, ...] = TINY_HINT,
                      seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 17])
    return {k: random_tensor(k, s, rng) for k, s in controlnet_shapes(cfg, hint).items()}


def make_controlnet(path: str | Path, cfg: UNetConfig = TINY_UNET, hint: tuple[int, ...] = TINY_HINT,
                    seed: int = 0, dtype: str = "float32", prefix: str = "control_model.",
                    extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write a random LDM-layout ControlNet (`.safetensors`, or a PyTorch zip for `.pth`/`.ckpt`)."""
    path = Path(path)
    weights = {prefix + k: v for k, v in random_controlnet(cfg, hint, seed).items()} | (extra or {})
    specs = [TensorSpec(k, v.shape, lambda a=v: a) for k, v in weights.items()]
    (write_torch_zip if path.suffix in (".pth", ".ckpt", ".pt") else write_safetensors)(path, specs, dtype)
    return path
