"""AUTOMATIC1111's prompt weighting ("Original" emphasis), for prompts that must give A1111's image.

How A1111 differs from ComfyUI (sd/text/prompt_weights.py, sd/text/encode.py), after its
``modules/prompt_parser.py: parse_prompt_attention`` and ``modules/sd_hijack_clip.py``:

* ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, and ``(x:w)`` *multiplies* by w (ComfyUI replaces),
  so ``((x:1.3))`` is 1.3 * 1.1. An unclosed bracket applies to the end; a stray closer is text.
  ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal; a backslash before anything else disappears.
* ``BREAK`` (a whole word, outside brackets) ends the current 75-token chunk.
* Chunks: 75 tokens between start and end, end-token padded. When a chunk fills up, the text after its
  last comma moves to the next chunk if that comma is within 20 tokens of the end
  (A1111's ``comma_padding_backtrack`` setting).
* Weights multiply the encoder's output directly, ``z * w``, and then each chunk is rescaled so that its
  mean over all tokens and channels is what it was before weighting: ``z * (mean_before / mean_after)``.
  (ComfyUI instead moves weighted tokens away from the empty prompt's encoding.)
"""

from __future__ import annotations

import math
import re

import mlx.core as mx

from sd.models.clip import CLIPTextModel, encode_tokens
from sd.text.prompt_weights import PromptError
from sd.text.tokenizer import END_ID, START_ID, CLIPTokenizer, default_tokenizer

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75
COMMA_PADDING_BACKTRACK = 20  # A1111's default setting
BREAK = ("BREAK", -1.0)  # A1111's marker in the parsed list (a weight no text gets)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)
# One lexical unit of A1111's prompt language: an escape, a bracket, ":number)" closing a round bracket
# with an explicit weight, a run of plain text, or a lone colon.
_UNIT = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:([+-]?[.\d]+)\)|[)\]]|[^\\()\[\]:]+|:")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``"a (b) [c]"`` -> ``[("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1/1.1)]``; BREAK: ``("BREAK", -1.0)``.

    PromptError for an explicit weight that is no finite number (A1111 itself fails there).
    """
    parsed: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for entry in parsed[start:]:
            entry[1] *= factor

    for match in _UNIT.finditer(text):
        unit, explicit = match.group(0), match.group(1)
        if unit.startswith("\\"):
            parsed.append([unit[1:], 1.0])
        elif unit in ("(", "["):
            (open_round if unit == "(" else open_square).append(len(parsed))
        elif explicit is not None and open_round:
            try:
                factor = float(explicit)
            except ValueError:
                raise PromptError(f"prompt weight ':{explicit})' is not a number") from None
            if not math.isfinite(factor):
                raise PromptError(f"prompt weight ':{explicit})' is not a finite number")
            scale_from(open_round.pop(), factor)
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK_WORD.split(unit)):
                if index:
                    parsed.append(list(BREAK))
                parsed.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)
    if not parsed:
        parsed = [["", 1.0]]
    merged: list[list] = [parsed[0]]
    for entry in parsed[1:]:  # neighbours of equal weight become one segment
        if entry[1] == merged[-1][1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    return [(segment, weight) for segment, weight in merged]


Chunk = list[tuple[int, float]]


def a1111_chunks(
    text: str, tokenizer: CLIPTokenizer | None = None, comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK
) -> list[Chunk]:
    """A1111's ``tokenize_line``: chunks of 77 (token, weight) pairs (start, 75 tokens, end)."""
    tokenizer = tokenizer or default_tokenizer()
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        padding = CHUNK_TOKENS - len(tokens)
        body = list(zip(tokens + [END_ID] * padding, weights + [1.0] * padding, strict=True))
        chunks.append([(START_ID, 1.0), *body, (END_ID, 1.0)])
        tokens, weights, last_comma = [], [], -1

    for segment, weight in parse_prompt_attention(text):
        if (segment, weight) == BREAK:
            close()
            continue
        for token in tokenizer.encode(segment):
            if token == comma:
                last_comma = len(tokens)
            elif (
                comma_padding_backtrack
                and len(tokens) == CHUNK_TOKENS
                and last_comma != -1
                and len(tokens) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def encode_prompt_a1111(
    clip_model: CLIPTextModel, text: str, clip_skip: int = -1, tokenizer: CLIPTokenizer | None = None
) -> tuple[mx.array, mx.array]:
    """Prompt text -> (conditioning [1, 77*k, C], pooled [1, C]), weighted and mean-restored as A1111."""
    chunks = a1111_chunks(text, tokenizer)
    rows = mx.array([[t for t, _ in chunk] for chunk in chunks], dtype=mx.int32)
    hidden, pooled = encode_tokens(clip_model, rows, clip_skip=clip_skip)
    z = hidden.astype(mx.float32)
    weights = mx.array([[w for _, w in chunk] for chunk in chunks], dtype=mx.float32)[..., None]
    before = mx.mean(z, axis=(1, 2), keepdims=True)  # one mean per chunk: A1111 encodes chunk by chunk
    z = z * weights
    z = z * (before / mx.mean(z, axis=(1, 2), keepdims=True))
    return z.reshape(1, -1, z.shape[-1]), pooled.astype(mx.float32)[:1]
