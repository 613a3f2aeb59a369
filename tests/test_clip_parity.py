"""CLIP text encoder against transformers' CLIPTextModel built from the same real-layout file (fp32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from component_loading import CLIP_PREFIX, load_component, write_component
from reference import read_state, transformers_clip
from sd15_keys import sd15_shapes

from sd.errors import SDGraphError
from sd.models.clip import CLIPTextConfig, CLIPTextModel, clip_config_from_weights, encode_tokens
from sd.synthetic.clip import SD15_CLIP, TINY_CLIP, random_clip_weights

TOLERANCE = 1e-4
START, END = 49406, 49407
# the tiny SD config has one head; a two-head variant checks the head split as well
TWO_HEADS = CLIPTextConfig(width=128, layers=2, heads=2, intermediate=320)


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference_clip(path, cfg: CLIPTextConfig):
    return transformers_clip(cfg, read_state(path))


def random_prompts(rng: np.random.Generator, lengths: list[int], n: int = 77) -> np.ndarray:
    """Rows of [start, random words..., end, end padding] as ComfyUI builds them."""
    rows = []
    for length in lengths:
        words = rng.integers(0, START, length).tolist()
        rows.append(([START, *words, END] + [END] * n)[:n])
    return np.array(rows, dtype=np.int64)


@pytest.fixture(scope="module", params=[(TINY_CLIP, "safetensors"), (TWO_HEADS, "ckpt")],
                ids=["tiny-safetensors", "two_heads-ckpt"])
def clip_pair(request, tmp_path_factory):
    cfg, fmt = request.param
    path = tmp_path_factory.mktemp("clip") / f"clip.{fmt}"
    write_component(path, CLIP_PREFIX, random_clip_weights(cfg, np.random.default_rng(5)))
    ours = load_component(path, "clip")
    assert isinstance(ours, CLIPTextModel)
    assert ours.config == cfg
    return ours, reference_clip(path, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("clip_skip", [-1, -2])
def test_hidden_states_and_pooled_match_transformers(clip_pair, clip_skip):
    ours, ref = clip_pair
    tokens = random_prompts(np.random.default_rng(6), [3, 40, 75])
    with torch.no_grad():
        out = ref(torch.from_numpy(tokens), output_hidden_states=True)
        # ComfyUI's SD1 path: the chosen layer goes through the final layer norm
        final_norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
        expected = final_norm(out.hidden_states[clip_skip]).numpy()
        expected_pooled = out.pooler_output.numpy()
    hidden, pooled = encode_tokens(ours, mx.array(tokens.astype(np.int32)), clip_skip=clip_skip)
    err, err_pooled = max_rel_err(np.array(hidden), expected), max_rel_err(np.array(pooled), expected_pooled)
    print(f"CLIP {ours.config.heads} head(s), clip skip {clip_skip}: hidden max rel err {err:.2e}, "
          f"pooled {err_pooled:.2e}")
    assert hidden.shape == (3, 77, ours.config.width)
    assert err <= TOLERANCE and err_pooled <= TOLERANCE


def test_last_layer_equals_transformers_last_hidden_state(clip_pair):
    ours, ref = clip_pair
    tokens = random_prompts(np.random.default_rng(7), [10])
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens)).last_hidden_state.numpy()
    hidden, _ = encode_tokens(ours, mx.array(tokens.astype(np.int32)))
    assert max_rel_err(np.array(hidden), expected) <= TOLERANCE


def test_clip_skip_out_of_range_is_a_clear_error(clip_pair):
    ours, _ = clip_pair
    tokens = mx.array(random_prompts(np.random.default_rng(8), [1]).astype(np.int32))
    for bad in (0, 1, -(ours.config.layers + 1)):
        with pytest.raises(SDGraphError, match="clip_skip"):
            encode_tokens(ours, tokens, clip_skip=bad)


def test_sd15_shapes_give_sd15_config():
    shapes = sd15_shapes(CLIP_PREFIX)
    assert clip_config_from_weights(shapes) == SD15_CLIP
    # the generator writes every real key except the position_ids buffer
    expected_keys = set(shapes) - {"text_model.embeddings.position_ids"}
    assert set(random_clip_weights(CLIPTextConfig(width=64, layers=12, heads=1, intermediate=64),
                                   np.random.default_rng(0))) == expected_keys
