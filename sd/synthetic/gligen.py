"""Random GLIGEN files in the layout of ComfyUI's repackaged `gligen_sd14_textbox_pruned.safetensors` (tests,
`sdgraph demo`): one `fuser.*` set per UNet transformer block, named after that block's keys, and
`position_net.*`, without a prefix."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from sd.gligen.model import POSITION_DIM, POSITION_HIDDEN

_SELF_ATTENTION_Q = re.compile(r"^(?:model\.diffusion_model\.)?(.*\.transformer_blocks\.\d+)"
                               r"\.attn1\.to_q\.weight$")


def transformer_blocks(unet_keys_and_shapes: Mapping[str, tuple]) -> dict[str, int]:
    """{'input_blocks.1.1.transformer_blocks.0': width, ...} of a UNet (keys with or without its prefix)."""
    return {m.group(1): shape[0] for key, shape in unet_keys_and_shapes.items()
            if (m := _SELF_ATTENTION_Q.match(key))}


def random_gligen_state(blocks: Mapping[str, int], key_dim: int, seed: int = 0, scale: float = 0.05,
                        alpha: float | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
    """Weights for a fuser per block (width from `blocks`) and the position net for `key_dim` wide text
    features. `alpha`: both gates' value (None: random, so every block matters)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, s: float = scale) -> np.ndarray:
        return (s * rng.standard_normal(shape)).astype(dtype)

    out: dict[str, np.ndarray] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = normal(n_out, n_in, s=n_in ** -0.5)
        if bias:
            out[f"{name}.bias"] = normal(n_out)

    for block, dim in blocks.items():
        f = f"{block}.fuser"
        linear(f"{f}.linear", dim, key_dim)
        for p in ("to_q", "to_k", "to_v"):
            linear(f"{f}.attn.{p}", dim, dim, bias=False)
        linear(f"{f}.attn.to_out.0", dim, dim)
        linear(f"{f}.ff.net.0.proj", dim * 8, dim)
        linear(f"{f}.ff.net.2", dim, dim * 4)
        for norm in ("norm1", "norm2"):
            out[f"{f}.{norm}.weight"] = (1 + normal(dim)).astype(dtype)
            out[f"{f}.{norm}.bias"] = normal(dim)
        for gate in ("alpha_attn", "alpha_dense"):
            value = rng.uniform(0.2, 1.0) if alpha is None else alpha
            out[f"{f}.{gate}"] = np.array(value, dtype=dtype)
    linear("position_net.linears.0", POSITION_HIDDEN, key_dim + POSITION_DIM)
    linear("position_net.linears.2", POSITION_HIDDEN, POSITION_HIDDEN)
    linear("position_net.linears.4", key_dim, POSITION_HIDDEN)
    out["position_net.null_positive_feature"] = normal(key_dim, s=1.0)
    out["position_net.null_position_feature"] = normal(POSITION_DIM, s=1.0)
    return out


def write_gligen(path: Path, state: Mapping[str, np.ndarray]) -> Path:
    """Write whole or not at all (a temp file, then renamed)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(dict(state), str(tmp))
    tmp.replace(path)
    return path


def gligen_for_checkpoint(path: Path, checkpoint: Path, seed: int = 0, alpha: float | None = None,
                          dtype=np.float32, keys: Iterable[str] | None = None) -> Path:
    """A random GLIGEN file fitting `checkpoint`'s UNet and text encoder (its pooled width)."""
    from sd.io.checkpoint_io import open_tensors

    tensors = open_tensors(checkpoint)
    shapes = {k: tensors.shape(k) for k in (keys or tensors.keys())}
    key_dim = next(s[0] for k, s in shapes.items() if k.endswith("text_model.final_layer_norm.weight"))
    return write_gligen(path, random_gligen_state(transformer_blocks(shapes), key_dim, seed, alpha=alpha,
                                                  dtype=dtype))
