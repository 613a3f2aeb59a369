"""Our CLIP tokenizer against transformers' CLIPTokenizer built from vocab.json / merges.txt that this test
derives from the same shipped BPE file, the standard way (OpenAI's construction)."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest
from transformers import CLIPTokenizer as HFCLIPTokenizer

from sd.text.tokenizer import END_ID, START_ID, default_tokenizer


def _byte_table() -> dict[int, str]:
    """Printable Latin-1 bytes map to themselves; the other bytes to chr(256), chr(257), ... in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def build_reference_tokenizer(folder) -> HFCLIPTokenizer:
    raw = resources.files("sd.text").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_byte_table().values())
    words = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = HFCLIPTokenizer.from_pretrained(str(folder))
    assert tokenizer("")["input_ids"] == [49406, 49407], "reference tokenizer did not load the vocabulary"
    return tokenizer


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> HFCLIPTokenizer:
    return build_reference_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


PROMPTS = [
    "",
    "   ",
    "\t\n ",
    "a photo of a cat",
    "A Photo Of A CAT, masterpiece!!! best quality...",
    "(masterpiece:1.2), [blurry], ((detailed eyes)), \\(escaped\\)",
    "CamelCaseWords and snake_case_words and kebab-case-words",
    "numbers 1234567890 3.14159 1e-5 -42 100% $9.99 #1",
    "it's don't we're they've I'm you'll he'd 'quoted' \"double\"",
    "café naïve résumé Ærøskøbing Straße ΟΔΟΣ Ελληνικά",
    "emoji 😀🎨🔥 👩‍👩‍👧 flags 🇯🇵 hearts ❤️",
    "中文提示词 日本語のプロンプト 한국어",
    "e\u0301 composed vs decomposed \u00e9",
    "math ∑∫√∞ ≤ ≥ arrows → ← symbols ©®™ §¶",
    "multiple     spaces\tand\ttabs\nand\nnewlines",
    "text with <|endoftext|> inside and <|startoftext|> too, <|ENDOFTEXT|> is not special",
    "İstanbul ΣΊΣΥΦΟΣ final sigma ΟΔΟΣ.",
    "controls \x00\x07\x1b nbsp\u00a0here ideographic\u3000space zero\u200bwidth ＦＵＬＬ ｗｉｄｔｈ",
    "url https://example.com/path?q=1&r=2 mail a.b@c.de",
    "ALLCAPSLONGWORDTHATISNOTINVOCABULARYATALLREALLYSUPERLONG",
    ", ".join(f"word{i} token{i * 7}" for i in range(60)),  # far more than 77 tokens
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(reference, prompt):
    expected = reference(prompt)["input_ids"]
    assert default_tokenizer()(prompt) == expected


def test_special_ids_and_empty(reference):
    assert default_tokenizer()("") == [START_ID, END_ID] == reference("")["input_ids"]
    assert len(default_tokenizer()(PROMPTS[-1])) > 77  # no truncation: chunking is the caller's job
