"""A1111 prompt weighting (sd/text/a1111_weights.py) against A1111's documented examples and a transcription.

The transcription below follows AUTOMATIC1111's modules/prompt_parser.py (parse_prompt_attention),
modules/sd_hijack_clip.py (tokenize_line) and modules/sd_emphasis.py ("Original": z * w, then the chunk's mean
restored), with transformers' tokenizer and CLIPTextModel on random weights as the encoder.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from component_loading import CLIP_PREFIX, load_component, write_component
from test_clip_parity import reference_clip
from test_tokenizer import build_reference_tokenizer

from sd.synthetic.clip import TINY_CLIP, random_clip_weights
from sd.text.a1111_weights import a1111_chunks, encode_prompt_a1111, parse_prompt_attention
from sd.text.encode import encode_prompt

START, END = 49406, 49407

# ---- A1111, transcribed --------------------------------------------------------------------------

_re_attention = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_parse(text):
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in _re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            parts = re.split(_re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def a1111_tokenize_line(line, hf_tokenizer, backtrack=20):
    parsed = a1111_parse(line)
    tokenized = hf_tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    comma_token = hf_tokenizer.get_vocab()[",</w>"]
    chunks, chunk = [], {"tokens": [], "multipliers": []}
    last_comma = -1

    def next_chunk():
        nonlocal last_comma, chunk
        to_add = 75 - len(chunk["tokens"])
        if to_add > 0:
            chunk["tokens"] += [END] * to_add
            chunk["multipliers"] += [1.0] * to_add
        chunk["tokens"] = [START] + chunk["tokens"] + [END]
        chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": []}

    for tokens, (text, weight) in zip(tokenized, parsed, strict=True):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk["tokens"])
            elif (
                backtrack != 0
                and len(chunk["tokens"]) == 75
                and last_comma != -1
                and len(chunk["tokens"]) - last_comma <= backtrack
            ):
                break_location = last_comma + 1
                reloc_tokens = chunk["tokens"][break_location:]
                reloc_mults = chunk["multipliers"][break_location:]
                chunk["tokens"] = chunk["tokens"][:break_location]
                chunk["multipliers"] = chunk["multipliers"][:break_location]
                next_chunk()
                chunk["tokens"] = reloc_tokens
                chunk["multipliers"] = reloc_mults
            if len(chunk["tokens"]) == 75:
                next_chunk()
            chunk["tokens"].append(token)
            chunk["multipliers"].append(weight)
            position += 1
    if chunk["tokens"] or not chunks:
        next_chunk()
    return chunks


def a1111_encode(ref, chunks, clip_skip):
    zs = []
    with torch.no_grad():
        for chunk in chunks:
            out = ref(torch.tensor([chunk["tokens"]]), output_hidden_states=True)
            norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
            z = norm(out.hidden_states[clip_skip]) if clip_skip != -1 else out.last_hidden_state
            multipliers = torch.asarray(chunk["multipliers"])
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            zs.append(z * (original_mean / new_mean))
    return torch.hstack(zs).numpy()


# ---- tests -----------------------------------------------------------------------------------------

DOCUMENTED = [  # parse_prompt_attention's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), DOCUMENTED)
def test_parse_matches_a1111_doctests(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_parse_matches_the_transcription_on_random_prompts():
    pieces = ["a", " cat", ", ", "(", ")", "[", "]", ":1.3)", ":0.5", ":", "\\(", "\\]", "\\", " BREAK "]
    pieces += ["BREAKfast", "red", "((", "))", " (x:2) ", "[[y]]", "\\\\"]
    rng = np.random.default_rng(0)
    for _ in range(400):
        prompt = "".join(rng.choice(pieces, size=rng.integers(0, 14)))
        assert parse_prompt_attention(prompt) == [tuple(e) for e in a1111_parse(prompt)], prompt


def test_break_and_brackets():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt_attention("[x]") == [("x", 1 / 1.1)]
    assert parse_prompt_attention("((x:1.3))") == [("x", 1.3 * 1.1)]  # multiplies, unlike ComfyUI


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return build_reference_tokenizer(tmp_path_factory.mktemp("tok"))


CHUNK_PROMPTS = [
    "",
    "a photo of a (red:1.3) cat, [blurry]",
    "a cat BREAK a dog",
    ", ".join(["a big red cat dog"] * 20),  # commas near the 75-token edge: the tail moves to the next chunk
    " ".join(["word"] * 160) + ", (end:1.2)",
    "BREAK",
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", CHUNK_PROMPTS)
def test_chunks_match_the_transcription(hf_tokenizer, prompt):
    expected = a1111_tokenize_line(prompt, hf_tokenizer)
    ours = a1111_chunks(prompt)
    assert [[t for t, _ in c] for c in ours] == [c["tokens"] for c in expected]
    assert [[w for _, w in c] for c in ours] == [c["multipliers"] for c in expected]


def test_comma_backtrack_moves_the_tail(hf_tokenizer):
    chunks = a1111_chunks(", ".join(["a big red cat dog"] * 20))
    first = [t for t, _ in chunks[0]]
    assert len(chunks) == 2 and first[-2] == END  # the first chunk was closed early, at a comma


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    write_component(path, CLIP_PREFIX, random_clip_weights(TINY_CLIP, np.random.default_rng(11)))
    return load_component(path, "clip"), reference_clip(path, TINY_CLIP)


@pytest.mark.slow
@pytest.mark.parametrize("clip_skip", [-1, -2])
@pytest.mark.parametrize("prompt", CHUNK_PROMPTS[1:5])
def test_encoding_matches_a1111(tiny_clip, hf_tokenizer, prompt, clip_skip):
    ours, ref = tiny_clip
    expected = a1111_encode(ref, a1111_tokenize_line(prompt, hf_tokenizer), clip_skip)
    cond, pooled = encode_prompt_a1111(ours, prompt, clip_skip=clip_skip)
    assert cond.shape == expected.shape
    err = float(np.abs(np.array(cond) - expected).max() / np.abs(expected).max())
    assert err <= 1e-4, err
    assert pooled.shape == (1, TINY_CLIP.width)


def test_a1111_weighting_differs_from_comfyui(tiny_clip):
    ours, _ = tiny_clip
    a1111, _ = encode_prompt_a1111(ours, "a (red:1.5) cat")
    comfy, _ = encode_prompt(ours, "a (red:1.5) cat")
    plain_a1111, _ = encode_prompt_a1111(ours, "a red cat")
    plain_comfy, _ = encode_prompt(ours, "a red cat")
    assert np.abs(np.array(a1111) - np.array(comfy)).max() > 1e-2
    np.testing.assert_allclose(np.array(plain_a1111), np.array(plain_comfy), atol=1e-5)  # no weights: equal
