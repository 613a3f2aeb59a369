"""Random CLIP text-encoder weights in the real key layout (``text_model.…``, PyTorch layout), for tests.

Keys are written out here, not read off our MLX module, so loading them also checks sd/models/clip.py's names.
"""

from __future__ import annotations

import numpy as np

from sd.models.clip import CLIPTextConfig

# Tiny width and depth, but the full vocabulary and 77 positions so the real tokenizer's ids fit.
# Width 64 = one 64-wide head; B's tiny UNet uses context_dim 64 to match.
TINY_CLIP = CLIPTextConfig(width=64, layers=3, heads=1, intermediate=256, vocab_size=49408, max_positions=77)
SD15_CLIP = CLIPTextConfig(width=768, layers=12, heads=12, intermediate=3072)


def random_clip_weights(config: CLIPTextConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{key without 'cond_stage_model.transformer.': float32 array in PyTorch layout}.

    The ``position_ids`` buffer real files often carry is not included (it is no parameter).
    """
    out: dict[str, np.ndarray] = {}

    def normal(shape: tuple, scale: float) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def linear(key: str, out_f: int, in_f: int) -> None:
        out[f"{key}.weight"] = normal((out_f, in_f), 1 / np.sqrt(in_f))
        out[f"{key}.bias"] = normal((out_f,), 0.05)

    def layer_norm(key: str) -> None:
        out[f"{key}.weight"] = 1 + normal((config.width,), 0.1)
        out[f"{key}.bias"] = normal((config.width,), 0.1)

    c = config.width
    out["text_model.embeddings.token_embedding.weight"] = normal((config.vocab_size, c), 0.5)
    out["text_model.embeddings.position_embedding.weight"] = normal((config.max_positions, c), 0.5)
    for i in range(config.layers):
        p = f"text_model.encoder.layers.{i}"
        layer_norm(f"{p}.layer_norm1")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{p}.self_attn.{name}", c, c)
        layer_norm(f"{p}.layer_norm2")
        linear(f"{p}.mlp.fc1", config.intermediate, c)
        linear(f"{p}.mlp.fc2", c, config.intermediate)
    layer_norm("text_model.final_layer_norm")
    return out
