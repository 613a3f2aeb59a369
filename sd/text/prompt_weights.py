"""ComfyUI's prompt weighting syntax, reproduced by behaviour (comfy/sd1_clip.py).

- ``(text:1.3)`` gives ``text`` weight 1.3 (the number *replaces* the outer weight); ``(text)`` multiplies the
  current weight by 1.1, so ``((text))`` is 1.1 * 1.1.
- ``\\(`` and ``\\)`` are literal parentheses; ``[text]`` is literal text (ComfyUI does not down-weight it).
- A parenthesis that does not close runs to the end of the text; a stray ``)`` just closes nothing.
- Each weighted segment is tokenized as a whole and becomes one token *group*; chunking (sd/text/encode.py)
  keeps groups shorter than 8 tokens inside one chunk.
- ``embedding:name`` (textual inversion; at the start of a segment or after a space or newline) puts the
  embedding's vectors in the prompt, with the segment's weight: ``(embedding:name:1.2)``. As ComfyUI's
  ``_try_get_embedding``: the name is the next word; a name not found is tried again without commas
  around it (``embedding:easynegative,`` means easynegative and a comma); the rest is ordinary text.
  A name that is not found is an error (ComfyUI warns and leaves the word out, which silently changes
  the image: a misspelt negative embedding would never be noticed).
- Refused too, where ComfyUI would go on: a weight that is not finite (``(x:nan)``, ``(x:inf)``: a black
  image), parentheses nested deeper than MAX_NESTING, and prompts over MAX_PROMPT_CHARS characters (the
  encoding grows with the prompt: 75 tokens a chunk, every chunk through the text encoder).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from sd.errors import SDGraphError
from sd.text.tokenizer import CLIPTokenizer, default_tokenizer

EMBEDDING_PREFIX = "embedding:"
# Control characters cannot come from a typed prompt, so they stand in for escaped parentheses while parsing.
_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"
MAX_PROMPT_CHARS = 100_000
MAX_NESTING = 100
_EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")
T = TypeVar("T")


class PromptError(SDGraphError):
    """A prompt uses syntax sdgraph cannot honour."""


def _escape(text: str) -> str:
    return text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def _split_top_level(text: str) -> list[str]:
    """Split into plain runs and top-level ``( ... )`` groups (an unclosed group runs to the end)."""
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                # a stray ')' at depth 0 drives depth negative, as in ComfyUI: later '(' then nest deeper
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _weigh(text: str, weight: float, level: int = 0) -> list[tuple[str, float]]:
    if level > MAX_NESTING:
        raise PromptError(f"prompt nests parentheses deeper than {MAX_NESTING} levels")
    out: list[tuple[str, float]] = []
    for part in _split_top_level(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])  # Python float() syntax, as ComfyUI parses it
                    inner = inner[:colon]
                except ValueError:
                    pass  # '(a:b)' is just text in a 1.1 group
                else:
                    if not math.isfinite(inner_weight):
                        raise PromptError(f"prompt weight '({inner[:40]}:{part[colon + 2:-1]})' is not a "
                                          "finite number; use a weight such as 1.2")
            out += _weigh(inner, inner_weight, level + 1)
        else:
            out.append((part, weight))
    return out


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """``"a (cat:1.2)"`` -> ``[("a ", 1.0), ("cat", 1.2)]``: segments (escapes resolved) and their weights.
    PromptError for what check_prompt refuses."""
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt has {len(text):,} characters (at most {MAX_PROMPT_CHARS:,}); shorten it")
    return [(_unescape(segment), weight) for segment, weight in _weigh(_escape(text), 1.0)]


def prompt_pieces(text: str) -> Iterator[tuple[str, float]]:
    """The weighted segments cut at each ``embedding:`` that follows a space or newline (ComfyUI's split):
    (piece, weight), where a piece that starts with ``embedding:`` names an embedding."""
    for segment, weight in parse_prompt_weights(text):
        pieces = _EMBEDDING_SPLIT.split(segment)
        for piece in [pieces[0]] + [EMBEDDING_PREFIX + p for p in pieces[1:]]:
            if piece:
                yield piece, weight


def embedding_reference(piece: str, lookup: Callable[[str], T | None]) -> tuple[T | None, str, str]:
    """For a piece ``embedding:NAME rest``: (lookup's answer or None, the name as written, the text left to
    tokenize), trying NAME without surrounding commas when NAME itself is not found, as ComfyUI does."""
    words = piece[len(EMBEDDING_PREFIX):].strip("\n").split()
    if not words:  # ComfyUI fails here (IndexError); a bare 'embedding:' names nothing
        raise PromptError("prompt has 'embedding:' without a name after it; write embedding:NAME")
    name, leftover = words[0], " ".join(words[1:])
    found = lookup(name)
    if found is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            return lookup(stripped), name, f"{name[len(stripped):]} {leftover}"
    return found, name, leftover


# a group's items: a token id, or one vector [C] of an embedding (sd/text/embeddings.py), with its weight
Group = list[tuple[object, float]]


def tokenize_weighted(text: str, tokenizer: CLIPTokenizer | None = None,
                      embedding: Callable[[str], object | None] | None = None) -> list[Group]:
    """Token groups, one per weighted segment: ``[[(token_id, weight), ...], ...]`` (no start/end tokens).

    ``embedding(name)`` gives an embedding's vectors [n, C] (None when there is no such embedding): each
    vector becomes one item ``(vector, weight)`` of a group of its own, in place of a token id. Without it,
    or when it answers None, a prompt naming an embedding is a PromptError."""
    tokenizer = tokenizer or default_tokenizer()
    groups: list[Group] = []
    for piece, weight in prompt_pieces(text):
        if piece.startswith(EMBEDDING_PREFIX):
            vectors, name, piece = embedding_reference(piece, embedding or (lambda name: None))
            if vectors is None:
                raise PromptError(f"prompt names embedding:{name}, which is not in the embeddings folder")
            groups.append([(vector, weight) for vector in vectors])
            if not piece:
                continue
        groups.append([(token, weight) for token in tokenizer.encode(piece)])
    return groups


def check_prompt(text: str) -> None:
    """What can be known about a prompt before running, without the tokenizer: PromptError for a prompt
    too long, nested too deep or with a weight that is not finite."""
    parse_prompt_weights(text)
