"""The CLIP text transformer (OpenAI CLIP-L as used by SD1.x) in MLX.

Parameter names equal the checkpoint keys minus ``cond_stage_model.transformer.``
(``text_model.encoder.layers.0.self_attn.q_proj.weight``); linear and embedding weights keep PyTorch's layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from sd.errors import CheckpointError, SDGraphError

# Every OpenAI / open_clip text tower uses 64-wide attention heads (CLIP-L: 768/12, OpenCLIP-H: 1024/16,
# bigG: 1280/20), so the head count follows from the width; it is not stored in the file.
HEAD_DIM = 64

# Buffers some files carry that are not parameters of the model; a loader should drop them.
CLIP_IGNORED_KEYS = ("text_model.embeddings.position_ids",)


@dataclass(frozen=True)
class CLIPTextConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77
    activation: str = "quick_gelu"  # OpenAI CLIP-L; OpenCLIP towers (SD2.x) use "gelu"
    layer_norm_eps: float = 1e-5


def clip_config_from_weights(shapes: Mapping[str, tuple], path: object = "<clip>") -> CLIPTextConfig:
    """Read the text encoder's hyper-parameters from prefix-stripped key -> shape."""
    prefix = "text_model."

    def shape(key: str) -> tuple:
        if prefix + key not in shapes:
            raise CheckpointError(path, f"CLIP key '{prefix + key}' is missing; not an SD1.x text encoder?")
        return tuple(shapes[prefix + key])

    vocab, width = shape("embeddings.token_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError(path, "no 'text_model.encoder.layers.N' keys: not a CLIP text encoder")
    if width % HEAD_DIM:
        raise CheckpointError(path, f"CLIP width {width} is not a multiple of the head size {HEAD_DIM}")
    return CLIPTextConfig(
        width=width,
        layers=max(layers) + 1,
        heads=width // HEAD_DIM,
        intermediate=shape("encoder.layers.0.mlp.fc1.weight")[0],
        vocab_size=vocab,
        max_positions=positions,
    )


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": nn.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, c = x.shape
        q, k, v = (
            p(x).reshape(b, n, self.heads, c // self.heads).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        # causal: a token sees only itself and earlier tokens
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=(c // self.heads) ** -0.5, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, intermediate: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)
        self._act = _ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self._act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.width, cfg.intermediate, cfg.activation)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def __call__(self, tokens: mx.array, inputs_embeds: mx.array | None = None) -> mx.array:
        """Token vectors (or ``inputs_embeds`` [B, N, C] given in their place) plus position vectors."""
        x = self.token_embedding(tokens) if inputs_embeds is None else inputs_embeds
        return x + self.position_embedding.weight[: tokens.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


@dataclass(frozen=True)
class CLIPTextOutput:
    hidden_states: list[mx.array]  # embeddings, then each layer's output (before the final norm)
    last_hidden_state: mx.array  # final layer after final_layer_norm
    pooled: mx.array  # last_hidden_state at each row's end-of-text token


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def __call__(self, tokens: mx.array, inputs_embeds: mx.array | None = None) -> CLIPTextOutput:
        """tokens [B, N<=max_positions] int32 -> all hidden states, the normed last one and pooled.

        ``inputs_embeds`` [B, N, C], when given, replaces the token vectors (textual-inversion vectors spliced
        in, sd/text/encode.py); ``tokens`` still place the pooled output at each row's end token."""
        tm = self.text_model
        x = tm.embeddings(tokens, inputs_embeds)
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        # end-of-text has the largest id in CLIP's vocabulary: pool at the first position holding the row's
        # largest id (torch's argmax rule, spelled out so it does not rest on a backend's tie-breaking)
        positions = mx.arange(tokens.shape[1])
        eos = mx.where(tokens == tokens.max(axis=-1, keepdims=True), positions, tokens.shape[1]).min(axis=-1)
        pooled = mx.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(hidden_states=hidden, last_hidden_state=last, pooled=pooled)


def encode_tokens(model: CLIPTextModel, tokens: mx.array, clip_skip: int = -1,
                  inputs_embeds: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Hidden states for conditioning and the pooled output, as ComfyUI's SD1 CLIP gives them.

    ``clip_skip`` is ComfyUI's ``stop_at_clip_layer``: -1 is the last layer, -2 the penultimate, ... The final
    layer norm is applied to the chosen layer (ComfyUI's ``layer_norm_hidden_state=True``); pooled always
    comes from the last layer.
    """
    layers = model.config.layers
    if not -layers <= clip_skip <= -1:
        raise SDGraphError(f"clip_skip must be between -{layers} and -1 for this {layers}-layer CLIP, "
                           f"got {clip_skip}")
    out = model(tokens, inputs_embeds)
    chosen = out.hidden_states[clip_skip]  # hidden_states has layers + 1 entries, so -1 is the last layer
    return model.text_model.final_layer_norm(chosen), out.pooled
