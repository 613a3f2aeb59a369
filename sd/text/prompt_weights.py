"""ComfyUI's prompt weighting syntax, reproduced by behaviour (comfy/sd1_clip.py).

- ``(text:1.3)`` gives ``text`` weight 1.3 (the number *replaces* the outer weight); ``(text)`` multiplies the
  current weight by 1.1, so ``((text))`` is 1.1 * 1.1.
- ``\\(`` and ``\\)`` are literal parentheses; ``[text]`` is literal text (ComfyUI does not down-weight it).
- A parenthesis that does not close runs to the end of the text; a stray ``)`` just closes nothing.
- Each weighted segment is tokenized as a whole and becomes one token *group*; chunking (sd/text/encode.py)
  keeps groups shorter than 8 tokens inside one chunk.
- ``embedding:name`` (textual inversion) is not supported yet and is refused with a clear message.
- Refused too, where ComfyUI would go on: a weight that is not finite (``(x:nan)``, ``(x:inf)``: a black
  image), parentheses nested deeper than MAX_NESTING, and prompts over MAX_PROMPT_CHARS characters (the
  encoding grows with the prompt: 75 tokens a chunk, every chunk through the text encoder).
"""

from __future__ import annotations

import math
import re

from sd.errors import SDGraphError
from sd.text.tokenizer import CLIPTokenizer, default_tokenizer

EMBEDDING_PREFIX = "embedding:"
# Control characters cannot come from a typed prompt, so they stand in for escaped parentheses while parsing.
_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"
MAX_PROMPT_CHARS = 100_000
MAX_NESTING = 100
_EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")


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


def tokenize_weighted(text: str, tokenizer: CLIPTokenizer | None = None) -> list[list[tuple[int, float]]]:
    """Token groups, one per weighted segment: ``[[(token_id, weight), ...], ...]`` (no start/end tokens)."""
    tokenizer = tokenizer or default_tokenizer()
    groups: list[list[tuple[int, float]]] = []
    for segment, weight in parse_prompt_weights(text):
        pieces = _EMBEDDING_SPLIT.split(segment)
        pieces = [pieces[0]] + [EMBEDDING_PREFIX + p for p in pieces[1:]]
        for piece in pieces:
            if piece == "":
                continue
            if piece.startswith(EMBEDDING_PREFIX):
                name = (piece[len(EMBEDDING_PREFIX) :].split() or [""])[0]
                raise PromptError(
                    f"prompt uses textual-inversion embedding 'embedding:{name}', which sdgraph does not "
                    f"support yet; remove it from the prompt (or write 'embedding :' to mean the plain words)"
                )
            groups.append([(token, weight) for token in tokenizer.encode(piece)])
    return groups



def check_prompt(text: str) -> None:
    """What can be known about a prompt before running, without the tokenizer: PromptError for a prompt
    too long, nested too deep or with a weight that is not finite."""
    parse_prompt_weights(text)
