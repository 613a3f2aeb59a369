"""ComfyUI prompt weighting: parsing, token groups, chunking and the empty-prompt interpolation.

Expected values are written by hand from ComfyUI's behaviour (comfy/sd1_clip.py); token ids come from
transformers' CLIPTokenizer and hidden states from transformers' CLIPTextModel, never from our own code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from component_loading import CLIP_PREFIX, load_component, write_component
from test_clip_parity import reference_clip
from test_tokenizer import build_reference_tokenizer

from sd.synthetic.clip import TINY_CLIP, random_clip_weights
from sd.text.encode import chunk_token_groups, encode_prompt
from sd.text.prompt_weights import PromptError, parse_prompt_weights, tokenize_weighted

START, END = 49406, 49407

PARSE_TABLE = [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("(cat: 2)", [("cat", 2.0)]),
    ("(cat:0.25 )", [("cat", 0.25)]),
    ("a (red:1.2) cat", [("a ", 1.0), ("red", 1.2), (" cat", 1.0)]),
    ("a (b)(c) d", [("a ", 1.0), ("b", 1.1), ("c", 1.1), (" d", 1.0)]),
    # an explicit number replaces the outer weight instead of multiplying it
    ("((red:0.5) cat)", [("red", 0.5), (" cat", 1.1)]),
    ("(a (b:1.5) c:0.8)", [("a ", 0.8), ("b", 1.5), (" c", 0.8)]),
    ("((a:1.3))", [("a", 1.3)]),
    # text after the last colon that is no number: a plain 1.1 group, colon kept
    ("(a:b)", [("a:b", 1.1)]),
    ("(:1.5)", [(":1.5", 1.1)]),
    ("(time: 12:30)", [("time: 12", 30.0)]),
    # escapes are literal parentheses; brackets are plain text
    ("\\(not weighted\\)", [("(not weighted)", 1.0)]),
    ("(\\(x\\):1.4)", [("(x)", 1.4)]),
    ("[blurry] [[x]]", [("[blurry] [[x]]", 1.0)]),
    # unbalanced: an unclosed group stays text; a stray ')' swallows the rest into one segment
    ("(unclosed", [("(unclosed", 1.0)]),
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
    ("stray) (x)", [("stray) (x)", 1.0)]),
    ("x (y:1.2))z", [("x ", 1.0), ("y", 1.2), (")z", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSE_TABLE)
def test_parse(prompt, expected):
    assert parse_prompt_weights(prompt) == expected


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return build_reference_tokenizer(tmp_path_factory.mktemp("tok"))


def ids(hf_tokenizer, text: str) -> list[int]:
    return hf_tokenizer(text)["input_ids"][1:-1]


@pytest.mark.slow
def test_token_groups_one_per_segment(hf_tokenizer):
    groups = tokenize_weighted("A photo of a (red:1.3) ((fluffy cat)), [blurry]")
    # the blank between two groups is a segment of its own: an empty token group
    texts = [("A photo of a ", 1.0), ("red", 1.3), (" ", 1.0), ("fluffy cat", 1.1 * 1.1), (", [blurry]", 1.0)]
    assert groups == [[(t, w) for t in ids(hf_tokenizer, text)] for text, w in texts]


def test_empty_and_whitespace_segments():
    assert tokenize_weighted("") == []
    assert tokenize_weighted("( )") == [[]]  # a weighted blank: an empty group, no tokens


@pytest.mark.parametrize("prompt", ["embedding:EasyNegative, lowres", "lowres, embedding:bad_hands",
                                    "a\nembedding:x"])
def test_embeddings_without_a_lookup_are_refused_clearly(prompt):
    # CLIPEncode passes the embeddings folder's lookup (tests/test_embeddings.py); without one, or for a
    # name the lookup does not know, the prompt is refused rather than the word dropped
    with pytest.raises(PromptError, match="embedding:.*not in the embeddings folder"):
        tokenize_weighted(prompt)


def test_embedding_word_inside_text_is_plain_text():
    assert tokenize_weighted("myembedding:x")  # no ' embedding:' boundary, so ordinary words


def _group(n: int, w: float = 1.0, token: int = 320) -> list[tuple[int, float]]:
    return [(token, w)] * n


def test_chunking_keeps_short_groups_together_and_splits_long_ones():
    # 70 tokens, then a 6-token group (short: moves whole), then a 10-token group (long: split at the edge)
    chunks = chunk_token_groups([_group(70, token=1), _group(6, 1.2, token=2)])
    assert len(chunks) == 2
    assert chunks[0] == [(START, 1.0)] + _group(70, token=1) + [(END, 1.0)] + [(END, 1.0)] * 5
    assert chunks[1] == [(START, 1.0)] + _group(6, 1.2, token=2) + [(END, 1.0)] * 70

    chunks = chunk_token_groups([_group(70, token=1), _group(10, token=3)])
    assert chunks[0] == [(START, 1.0)] + _group(70, token=1) + _group(5, token=3) + [(END, 1.0)]
    assert chunks[1] == [(START, 1.0)] + _group(5, token=3) + [(END, 1.0)] * 71

    # a 7-token group is still "short", an 8-token group is "long"
    assert len(chunk_token_groups([_group(70), _group(7)])[0]) == 77
    assert chunk_token_groups([_group(70), _group(7)])[0][71] == (END, 1.0)
    assert chunk_token_groups([_group(70), _group(8)])[0][71] == (320, 1.0)
    # exactly 75 tokens fit one chunk
    assert len(chunk_token_groups([_group(75)])) == 1
    assert all(len(c) == 77 for c in chunk_token_groups([_group(3)] * 60))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    write_component(path, CLIP_PREFIX, random_clip_weights(TINY_CLIP, np.random.default_rng(11)))
    return load_component(path, "clip"), reference_clip(path, TINY_CLIP)


def _reference_layer(ref, rows: list[list[int]], clip_skip: int) -> np.ndarray:
    with torch.no_grad():
        out = ref(torch.tensor(rows), output_hidden_states=True)
        norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
        return norm(out.hidden_states[clip_skip]).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("clip_skip", [-1, -2])
def test_weighting_interpolates_from_the_empty_prompt(tiny_clip, hf_tokenizer, clip_skip):
    ours, ref = tiny_clip
    segments = [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("blue", 1.1 * 1.1), (" sky", 0.7)]
    prompt = "a (red:1.5) cat, ((blue)) (sky:0.7)"
    row, weights = [START], [1.0]
    for text, w in segments:
        row += ids(hf_tokenizer, text)
        weights += [w] * len(ids(hf_tokenizer, text))
    row += [END] * (77 - len(row))
    weights += [1.0] * (77 - len(weights))
    z, z_empty = _reference_layer(ref, [row, [START] + [END] * 76], clip_skip)
    w = np.array(weights, dtype=np.float32)[:, None]
    expected = np.where(w != 1.0, (z - z_empty) * w + z_empty, z)[None]

    cond, pooled = encode_prompt(ours, prompt, clip_skip=clip_skip)
    err = float(np.abs(np.array(cond) - expected).max() / np.abs(expected).max())
    print(f"weighted prompt, clip skip {clip_skip}: max rel err {err:.2e}")
    assert cond.shape == (1, 77, TINY_CLIP.width) and err <= 1e-4
    # the weighting really moved the weighted tokens (else the check above would prove little)
    assert np.abs(expected[0] - z).max() > 1e-2
    with torch.no_grad():
        expected_pooled = ref(torch.tensor([row])).pooler_output.numpy()
    assert np.abs(np.array(pooled) - expected_pooled).max() <= 1e-4 * np.abs(expected_pooled).max()


def test_unweighted_prompt_is_the_plain_encoding(tiny_clip, hf_tokenizer):
    ours, ref = tiny_clip
    row = [START] + ids(hf_tokenizer, "a cat on a mat") + [END]
    row += [END] * (77 - len(row))
    cond, _ = encode_prompt(ours, "a cat on a mat")
    expected = _reference_layer(ref, [row], -1)
    assert np.abs(np.array(cond) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_empty_prompt_is_one_chunk(tiny_clip):
    ours, _ = tiny_clip
    cond, pooled = encode_prompt(ours, "")
    assert cond.shape == (1, 77, TINY_CLIP.width) and pooled.shape == (1, TINY_CLIP.width)


def test_long_prompt_three_chunks(tiny_clip, hf_tokenizer):
    ours, ref = tiny_clip
    prompt = " ".join(["cat"] * 200)
    tokens = ids(hf_tokenizer, prompt)
    assert len(tokens) == 200
    cond, pooled = encode_prompt(ours, prompt)
    assert cond.shape == (1, 231, TINY_CLIP.width)
    # one unweighted group of 200 tokens is split 75 / 75 / 50; each chunk is encoded on its own
    rows = [[START] + tokens[i : i + 75] + [END] for i in (0, 75, 150)]
    rows = [r + [END] * (77 - len(r)) for r in rows]
    expected = _reference_layer(ref, rows, -1).reshape(1, 231, -1)
    assert np.abs(np.array(cond) - expected).max() <= 1e-4 * np.abs(expected).max()
    with torch.no_grad():
        expected_pooled = ref(torch.tensor(rows[:1])).pooler_output.numpy()
    assert np.abs(np.array(pooled) - expected_pooled).max() <= 1e-4 * np.abs(expected_pooled).max()


def test_weights_in_a_later_chunk_use_the_same_empty_prompt(tiny_clip, hf_tokenizer):
    ours, ref = tiny_clip
    cond, _ = encode_prompt(ours, " ".join(["cat"] * 100) + " (dog:1.3)")
    # one 100-token group split 75 / 25, then the short 'dog' group joins the second chunk
    cat, dog = ids(hf_tokenizer, "cat"), ids(hf_tokenizer, "dog")
    second = [START] + cat * 25 + dog + [END]
    second += [END] * (77 - len(second))
    z, z_empty = _reference_layer(ref, [second, [START] + [END] * 76], -1)
    expected = z.copy()
    expected[26] = (z[26] - z_empty[26]) * 1.3 + z_empty[26]
    assert cond.shape == (1, 154, TINY_CLIP.width)
    assert np.abs(np.array(cond[0, 77:]) - expected).max() <= 1e-4 * np.abs(expected).max()
