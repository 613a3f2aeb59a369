"""CLIP's byte-level BPE tokenizer, reading the vocabulary in sd/text/data (OpenAI CLIP, MIT licensed).

Text cleaning follows transformers' ``CLIPTokenizer`` (the one ComfyUI calls, without ftfy): special tokens
are split off the raw text first, then Unicode NFC, runs of whitespace become one space, lower case, CLIP's
pre-tokenizer pattern, UTF-8 bytes mapped to printable characters, BPE with ``</w>`` marking a word's end.
"""

from __future__ import annotations

import gzip
import unicodedata
from functools import cache, lru_cache
from importlib import resources

import regex

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
START_ID = 49406
END_ID = 49407

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The file holds more merges than CLIP uses: its vocabulary is 256 bytes x 2 (plain and '</w>') + these
# merges + 2 specials = 49408.
NUM_MERGES = 49152 - 256 - 2

_SPECIALS = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>")
_WHITESPACE = regex.compile(r"\s+")
_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from each byte to a printable character (so BPE never sees raw bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _normalize(text: str) -> str:
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # character by character, as the tokenizers library lowercases (no final-sigma rule, unlike str.lower)
    return "".join(c.lower() for c in text)


class CLIPTokenizer:
    """``encode(text)`` -> token ids without start/end; ``__call__`` adds them (no truncation, no padding)."""

    start_id = START_ID
    end_id = END_ID

    def __init__(self, merges: list[tuple[str, str]]):
        byte_chars = list(bytes_to_unicode().values())
        words = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        words += [START_TOKEN, END_TOKEN]
        self.vocab: dict[str, int] = {w: i for i, w in enumerate(words)}
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._byte_chars = bytes_to_unicode()
        if self.vocab[START_TOKEN] != START_ID or self.vocab[END_TOKEN] != END_ID:
            raise ValueError(f"{VOCAB_FILE}: unexpected vocabulary size {len(self.vocab)}")

    @classmethod
    def from_package(cls) -> CLIPTokenizer:
        data = resources.files("sd.text").joinpath("data", VOCAB_FILE).read_bytes()
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
        return cls(merges)

    def __call__(self, text: str) -> list[int]:
        return [START_ID, *self.encode(text), END_ID]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for special in _SPECIALS.finditer(text):  # matched on the raw text, case-sensitive
            ids += self._encode_plain(text[pos : special.start()])
            ids.append(self.vocab[special.group()])
            pos = special.end()
        return ids + self._encode_plain(text[pos:])

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _PIECES.findall(_normalize(text)):
            chars = "".join(self._byte_chars[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[t] for t in self._bpe(chars)]
        return ids

    @lru_cache(maxsize=65536)  # noqa: B019  (one tokenizer lives for the whole process)
    def _bpe(self, chars: str) -> tuple[str, ...]:
        word = [*chars[:-1], chars[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word[:-1], word[1:], strict=True)}
            best = min(pairs, key=lambda p: self._ranks.get(p, len(self._ranks)))
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)


@cache
def default_tokenizer() -> CLIPTokenizer:
    """The process-wide tokenizer over the shipped vocabulary (built once, well under a second)."""
    return CLIPTokenizer.from_package()
