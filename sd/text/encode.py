"""Prompt text -> conditioning, as ComfyUI's CLIPTextEncode does it for SD1.x.

Weighted token groups (sd/text/prompt_weights.py) are packed into chunks of 75 tokens plus start/end,
padded with the end token; a textual-inversion embedding's vectors take token places of their own (one per
vector, chunked like any group) and are spliced into the token vectors the text encoder reads, before the
position vectors are added (ComfyUI's ``process_tokens``); every chunk is encoded at the chosen CLIP layer;
where any weight differs from 1,
each weighted token is pushed away from the empty prompt's encoding: z = (z - z_empty) * w + z_empty. Chunks
are joined along the token axis: [1, 77*k, C]. The pooled output comes from the first chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from sd.models.clip import CLIPTextModel, encode_tokens
from sd.text.prompt_weights import tokenize_weighted
from sd.text.tokenizer import END_ID, START_ID, CLIPTokenizer

CHUNK_LENGTH = 77  # CLIP's context: start + 75 tokens + end
# ComfyUI keeps a group shorter than this whole by moving it to the next chunk; longer groups are split.
MAX_WORD_LENGTH = 8

Chunk = list[tuple[object, float]]  # (token id or an embedding's vector [C], weight)
# the token id written where a vector is spliced in: any id below the end token keeps pooling there
SPLICED_PLACEHOLDER = 0


def chunk_token_groups(groups: list[Chunk], start: int = START_ID, end: int = END_ID,
                       pad: int = END_ID, length: int = CHUNK_LENGTH) -> list[Chunk]:
    """Pack token groups into chunks of exactly ``length`` (token, weight) pairs: start, tokens, end, pads."""
    chunks: list[Chunk] = []
    chunk: Chunk = [(start, 1.0)]
    for group in groups:
        splittable = len(group) >= MAX_WORD_LENGTH
        at = 0  # an index, not `group = group[room:]`: that copy made long prompts quadratic
        while at < len(group):
            room = length - 1 - len(chunk)  # leave space for the end token
            if len(group) - at <= room:
                chunk.extend(group[at:])
                break
            if splittable:
                chunk.extend(group[at:at + room])
                chunk.append((end, 1.0))
                at += room
            else:  # close this chunk early; the whole group opens the next one
                chunk.append((end, 1.0))
                chunk.extend([(pad, 1.0)] * room)
            chunks.append(chunk)
            chunk = [(start, 1.0)]
    chunk.append((end, 1.0))
    chunk.extend([(pad, 1.0)] * (length - len(chunk)))
    chunks.append(chunk)
    return chunks


def empty_chunk(length: int = CHUNK_LENGTH, start: int = START_ID, end: int = END_ID,
                pad: int = END_ID) -> list[int]:
    return [start, end] + [pad] * (length - 2)


def encode_weighted_chunks(model: CLIPTextModel, chunks: list[Chunk],
                           clip_skip: int = -1) -> tuple[mx.array, mx.array]:
    """ComfyUI's ``encode_token_weights``: chunks -> ([1, 77*k, C] float32, pooled [1, C] float32)."""
    # decide on the Python floats: a weight like 1.00000001 still counts as weighted, as in ComfyUI
    is_weighted = [[w != 1.0 for _, w in chunk] for chunk in chunks]
    weighted = any(map(any, is_weighted))
    rows = [[t if isinstance(t, int) else SPLICED_PLACEHOLDER for t, _ in chunk] for chunk in chunks]
    if weighted:
        rows.append(empty_chunk(len(rows[0])))
    tokens = mx.array(rows, dtype=mx.int32)
    hidden, pooled = encode_tokens(model, tokens, clip_skip=clip_skip,
                                   inputs_embeds=_spliced_embeddings(model, tokens, chunks))
    hidden, pooled = hidden.astype(mx.float32), pooled.astype(mx.float32)
    z = hidden[: len(chunks)]
    if weighted:
        z_empty = hidden[-1:]
        w = mx.array([[w for _, w in chunk] for chunk in chunks], dtype=mx.float32)[..., None]
        # only tokens with a weight other than 1 are touched, so unweighted ones stay bit-identical
        z = mx.where(mx.array(is_weighted)[..., None], (z - z_empty) * w + z_empty, z)
    return z.reshape(1, -1, z.shape[-1]), pooled[:1]


def _spliced_embeddings(model: CLIPTextModel, tokens: mx.array, chunks: list[Chunk]) -> mx.array | None:
    """The token vectors with the chunks' embedding vectors in their places, or None when there are none."""
    places = [(r, c, item) for r, chunk in enumerate(chunks) for c, (item, _) in enumerate(chunk)
              if not isinstance(item, int)]
    if not places:
        return None
    embeds = model.text_model.embeddings.token_embedding(tokens)
    mask = np.zeros(tokens.shape, dtype=bool)
    values = np.zeros((*tokens.shape, embeds.shape[-1]), dtype=np.float32)
    for r, c, vector in places:
        mask[r, c], values[r, c] = True, vector
    return mx.where(mx.array(mask)[..., None], mx.array(values).astype(embeds.dtype), embeds)


def encode_prompt(clip_model: CLIPTextModel, text: str, clip_skip: int = -1,
                  tokenizer: CLIPTokenizer | None = None,
                  embedding: Callable[[str], object | None] | None = None) -> tuple[mx.array, mx.array]:
    """Prompt text -> (conditioning [1, 77*k, C], pooled [1, C]); ``clip_skip`` -1 is the last layer;
    ``embedding(name)`` gives the vectors of ``embedding:name`` (None: no such embedding)."""
    chunks = chunk_token_groups(tokenize_weighted(text, tokenizer, embedding))
    return encode_weighted_chunks(clip_model, chunks, clip_skip)
