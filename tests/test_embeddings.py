"""Textual-inversion embeddings: files in every layout, lookup, ComfyUI's tokens and weights, the text
encoder fed spliced input embeddings (against transformers' CLIP), and the engine's view (cache keys and a
missing embedding at validation).

The expected tokens come from a transcription of ComfyUI's ``SDTokenizer.tokenize_with_weights`` (with
``token_weights``, ``_try_get_embedding`` and the batching loop) over transformers' CLIPTokenizer; the
expected encodings from ComfyUI's ``process_tokens`` + ``encode_token_weights`` over transformers' CLIP.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from component_loading import CLIP_PREFIX, load_component, write_component
from reference import read_state, transformers_clip
from safetensors.numpy import save_file
from sd_nodes_testing import SMALL, WORKFLOWS, run_cli
from test_tokenizer import build_reference_tokenizer

from graph.context import Folders
from graph.fingerprint import FingerprintIndex
from graph.importers import load_workflow
from graph.plan import make_plan
from graph.runner import prepare
from sd.errors import CheckpointError
from sd.models.clip import encode_tokens
from sd.synthetic import make_checkpoint
from sd.synthetic.clip import TINY_CLIP, random_clip_weights
from sd.text.embeddings import find_embedding, load_embedding
from sd.text.encode import chunk_token_groups, encode_prompt
from sd.text.prompt_weights import PromptError, tokenize_weighted
from sd.text.tokenizer import default_tokenizer

WIDTH = TINY_CLIP.width
START, END = 49406, 49407


# --- files -----------------------------------------------------------------------------------------

def vectors(n: int, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def write_a1111_pt(path: Path, vec: np.ndarray, parameter: bool = False) -> Path:
    tensor = torch.from_numpy(vec).requires_grad_(True)
    value = torch.nn.Parameter(tensor) if parameter else tensor
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": value}, "name": path.stem,
                "step": 1500, "sd_checkpoint": "81761151", "sd_checkpoint_name": "v1-5-pruned"}, path)
    return path


LAYOUTS = {
    "a1111.pt": lambda p, v: write_a1111_pt(p, v),
    "a1111-parameter.pt": lambda p, v: write_a1111_pt(p, v, parameter=True),
    # the original textual_inversion code saved an nn.ParameterDict (a module: read as a dict of its tensors)
    "ldm-parameterdict.pt": lambda p, v: torch.save(
        {"string_to_token": {"*": 265},
         "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.from_numpy(v))})}, p),
    "kohya.safetensors": lambda p, v: save_file({"emb_params": v}, str(p)),
    "sdxl.safetensors": lambda p, v: save_file({"clip_g": vectors(len(v), 1280), "clip_l": v}, str(p)),
    "learned_embeds.bin": lambda p, v: torch.save({"<cat-toy>": torch.from_numpy(v)}, p),
    "learned_embeds.safetensors": lambda p, v: save_file({"<cat-toy>": v}, str(p)),
    "fp16.safetensors": lambda p, v: save_file({"emb_params": v.astype(np.float16)}, str(p)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 5])
def test_every_layout_gives_its_vectors(tmp_path, layout, n):
    vec = vectors(n, seed=n)
    path = tmp_path / layout
    LAYOUTS[layout](path, vec)
    got = load_embedding(path, WIDTH)
    expected = vec.astype(np.float16).astype(np.float32) if "fp16" in layout else vec
    np.testing.assert_array_equal(got, expected)


def test_single_vector_diffusers_embedding(tmp_path):
    vec = vectors(1)[0]
    torch.save({"<tok>": torch.from_numpy(vec)}, tmp_path / "learned_embeds.bin")  # shape [C]
    np.testing.assert_array_equal(load_embedding(tmp_path / "learned_embeds.bin", WIDTH), vec[None])


@pytest.mark.parametrize("make, match", [
    (lambda p: save_file({"clip_g": vectors(2, 1280)}, str(p)), "1280.*CLIP-G"),
    (lambda p: save_file({"emb_params": vectors(2, 1024)}, str(p)), "SD2"),
    (lambda p: save_file({"emb_params": np.full((2, WIDTH), np.nan, np.float32)}, str(p)), "not finite"),
    (lambda p: save_file({"emb_params": vectors(301)}, str(p)), "301 vectors"),
])
def test_unusable_embeddings_are_clear_errors(tmp_path, make, match):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=match):
        load_embedding(path, WIDTH)


class Exploit:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


def test_a_pickle_that_calls_something_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="allow-list"):
        load_embedding(path, WIDTH)


def test_lookup_as_comfyui_subfolders_extensions_and_containment(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "neg" / "deep").mkdir(parents=True)
    save_file({"emb_params": vectors(1)}, str(folder / "top.safetensors"))
    save_file({"emb_params": vectors(1)}, str(folder / "neg" / "deep" / "badhands.safetensors"))
    torch.save({"<t>": torch.zeros(WIDTH)}, folder / "neg" / "style.bin")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert find_embedding("top", folder) == folder / "top.safetensors"
    assert find_embedding("top.safetensors", folder) == folder / "top.safetensors"
    assert find_embedding("badhands", folder) == folder / "neg" / "deep" / "badhands.safetensors"
    assert find_embedding("neg/style", folder) == folder / "neg" / "style.bin"
    assert find_embedding("style", folder) == folder / "neg" / "style.bin"
    assert find_embedding("../outside", folder) is None
    assert find_embedding("nothing", folder) is None and find_embedding("a\0b", folder) is None
    (folder / "neg" / "loop").symlink_to(folder, target_is_directory=True)  # a link loop ends
    assert find_embedding("badhands", folder) == folder / "neg" / "deep" / "badhands.safetensors"


# --- ComfyUI's tokenize_with_weights, transcribed ---------------------------------------------------

def comfy_parse_parentheses(string):
    result, current, nesting = [], "", 0
    for char in string:
        if char == "(":
            if nesting == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += char
            nesting += 1
        elif char == ")":
            nesting -= 1
            if nesting == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def comfy_token_weights(string, current_weight):
    out = []
    for x in comfy_parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            xx = x.rfind(":")
            weight *= 1.1
            if xx > 0:
                try:
                    weight = float(x[xx + 1:])
                    x = x[:xx]
                except ValueError:
                    pass
            out += comfy_token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def comfy_tokenize_with_weights(text, hf, load_embed):
    """ComfyUI's SDTokenizer.tokenize_with_weights for SD1 (max_length 77, max_word_length 8, pad = end)."""
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    tokens = []
    for segment, weight in comfy_token_weights(text, 1.0):
        to_tokenize = segment.replace("\0\1", ")").replace("\0\2", "(")
        split = re.split(" embedding:|\nembedding:", to_tokenize)
        to_tokenize = [x for x in [split[0]] + ["embedding:" + s for s in split[1:]] if x != ""]
        for word in to_tokenize:
            if word.startswith("embedding:"):
                name = word[len("embedding:"):].strip("\n")
                split_embed = name.split()  # _try_get_embedding
                name, leftover = split_embed[0], " ".join(split_embed[1:])
                embed = load_embed(name)
                if embed is None:
                    stripped = name.strip(",")
                    if len(stripped) < len(name):
                        embed = load_embed(stripped)
                        leftover = f"{name[len(stripped):]} {leftover}"
                assert embed is not None
                tokens.append([(embed[x], weight) for x in range(embed.shape[0])])
                if leftover != "":
                    word = leftover
                else:
                    continue
            tokens.append([(t, weight) for t in hf(word)["input_ids"][1:-1]])
    batched, batch = [], [(START, 1.0)]
    batched.append(batch)
    for t_group in tokens:
        is_large = len(t_group) >= 8
        while len(t_group) > 0:
            if len(t_group) + len(batch) > 77 - 1:
                remaining = 77 - len(batch) - 1
                if is_large:
                    batch.extend(t_group[:remaining])
                    batch.append((END, 1.0))
                    t_group = t_group[remaining:]
                else:
                    batch.append((END, 1.0))
                    batch.extend([(END, 1.0)] * remaining)
                batch = [(START, 1.0)]
                batched.append(batch)
            else:
                batch.extend(t_group)
                t_group = []
    batch.append((END, 1.0))
    batch.extend([(END, 1.0)] * (77 - len(batch)))
    return batched


EMBEDDINGS = {"easyneg": vectors(8, seed=1), "badhand": vectors(2, seed=2), "one": vectors(1, seed=3),
              "sub/style": vectors(6, seed=4), "big": vectors(80, seed=5)}

PROMPTS = [
    "embedding:easyneg",
    "blurry, embedding:easyneg, lowres",
    "lowres, (embedding:badhand:1.2), bad anatomy",
    "((embedding:one)) and (embedding:one) twice",
    "embedding:easyneg, embedding:badhand,",          # a comma after the name: retried without it
    "text\nembedding:sub/style on a new line",
    "a (red:1.3) cat, embedding:one\n(embedding:badhand:0.8)",
    "myembedding:one is plain text",                  # no space or newline before: ordinary words
    " ".join(["word"] * 70) + " embedding:badhand, end",   # short group moves whole to the next chunk
    " ".join(["word"] * 70) + " embedding:easyneg end",    # 8 vectors: split at the chunk's edge
    "embedding:big, then words",                      # more vectors than a chunk holds
    "\\(escaped\\) embedding:one (nested (embedding:badhand:1.5) deeper)",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return build_reference_tokenizer(tmp_path_factory.mktemp("tok"))


def same_items(ours, theirs) -> bool:
    if len(ours) != len(theirs):
        return False
    for (a, wa), (b, wb) in zip(ours, theirs, strict=True):
        if wa != wb or isinstance(a, int) != isinstance(b, int):
            return False
        if not (a == b if isinstance(a, int) else np.array_equal(np.asarray(a), b.numpy())):
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokens_and_weights_equal_comfyui(hf_tokenizer, prompt):
    def comfy_load(name):
        return torch.from_numpy(EMBEDDINGS[name]) if name in EMBEDDINGS else None

    ours = chunk_token_groups(tokenize_weighted(prompt, default_tokenizer(), EMBEDDINGS.get))
    theirs = comfy_tokenize_with_weights(prompt, hf_tokenizer, comfy_load)
    assert len(ours) == len(theirs)
    for chunk, expected in zip(ours, theirs, strict=True):
        assert len(chunk) == 77 and same_items(chunk, expected)


def test_a_missing_embedding_is_an_error_not_a_silent_drop():
    with pytest.raises(PromptError, match="embedding:nothere"):
        tokenize_weighted("a cat, embedding:nothere", embedding=EMBEDDINGS.get)
    with pytest.raises(PromptError, match="without a name"):
        tokenize_weighted("a cat, embedding: ", embedding=EMBEDDINGS.get)


# --- the text encoder fed spliced embeddings ---------------------------------------------------------

@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    write_component(path, CLIP_PREFIX, random_clip_weights(TINY_CLIP, np.random.default_rng(5)))
    return load_component(path, "clip"), transformers_clip(TINY_CLIP, read_state(path))


def hf_encode_embeds(ref, inputs_embeds: torch.Tensor, layer: int = -1) -> np.ndarray:
    """transformers' CLIP text transformer from input embeddings; the chosen layer through the final norm."""
    from transformers.masking_utils import create_causal_mask

    tm = ref.text_model if hasattr(ref, "text_model") else ref
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for block in tm.encoder.layers]
    try:
        with torch.no_grad():
            hidden = tm.embeddings(inputs_embeds=inputs_embeds)
            mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, cache=None)
            tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
            return tm.final_layer_norm(outputs[layer]).numpy()
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("clip_skip", [-1, -2])
def test_hidden_states_from_inputs_embeds_equal_transformers(clip_pair, clip_skip):
    ours, ref = clip_pair
    rng = np.random.default_rng(7)
    tokens = np.array([[START, *rng.integers(0, START, 10), END] + [END] * 65,
                       [START, *rng.integers(0, START, 40), END] + [END] * 35], dtype=np.int64)
    tm = ref.text_model if hasattr(ref, "text_model") else ref
    with torch.no_grad():
        embeds = tm.embeddings.token_embedding(torch.from_numpy(tokens)).clone()
    embeds[0, 3:6] = torch.from_numpy(vectors(3, seed=8))
    embeds[1, 1:9] = torch.from_numpy(vectors(8, seed=9))
    hidden, _ = encode_tokens(ours, mx.array(tokens.astype(np.int32)), clip_skip=clip_skip,
                              inputs_embeds=mx.array(embeds.numpy()))
    expected = hf_encode_embeds(ref, embeds, clip_skip)
    assert float(np.abs(np.array(hidden) - expected).max() / np.abs(expected).max()) <= 1e-4


def comfy_encode(ref, batched, layer=-1):
    """ComfyUI's process_tokens (vectors inserted at their places) + encode_token_weights (weights pull
    each weighted token away from the empty prompt's encoding), over transformers' CLIP."""
    tm = ref.text_model if hasattr(ref, "text_model") else ref
    rows = []
    for chunk in batched:
        ids = [t for t, _ in chunk if isinstance(t, int)]
        with torch.no_grad():
            embeds = tm.embeddings.token_embedding(torch.tensor([ids]))
        for index, (t, _) in enumerate(chunk):
            if not isinstance(t, int):
                embeds = torch.cat([embeds[:, :index], t.view(1, 1, -1), embeds[:, index:]], dim=1)
        rows.append(embeds)
    has_weights = any(w != 1.0 for chunk in batched for _, w in chunk)
    if has_weights:
        with torch.no_grad():
            rows.append(tm.embeddings.token_embedding(torch.tensor([[START, END] + [END] * 75])))
    out = torch.from_numpy(hf_encode_embeds(ref, torch.cat(rows), layer))
    z_empty = out[-1]
    result = []
    for k, chunk in enumerate(batched):
        z = out[k].clone()
        for j, (_, weight) in enumerate(chunk):
            if weight != 1.0:
                z[j] = (z[j] - z_empty[j]) * weight + z_empty[j]
        result.append(z)
    return torch.cat(result).numpy()


@pytest.mark.parametrize("prompt", ["lowres, (embedding:badhand:1.2), bad anatomy",
                                    "embedding:easyneg, blurry",
                                    " ".join(["word"] * 70) + " (embedding:easyneg:0.7) end"])
def test_encodings_equal_comfyui_weighting(clip_pair, hf_tokenizer, prompt):
    ours_model, ref = clip_pair

    def comfy_load(name):
        return torch.from_numpy(EMBEDDINGS[name]) if name in EMBEDDINGS else None

    cond, _ = encode_prompt(ours_model, prompt, embedding=EMBEDDINGS.get)
    expected = comfy_encode(ref, comfy_tokenize_with_weights(prompt, hf_tokenizer, comfy_load))
    ours = np.array(cond)[0]
    assert ours.shape == expected.shape
    assert float(np.abs(ours - expected).max() / np.abs(expected).max()) <= 1e-4


# --- the engine: cache keys, validation, the example -------------------------------------------------

def make_models(root: Path) -> Path:
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    make_checkpoint(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors", "tiny")
    (models / "embeddings" / "neg").mkdir(parents=True)
    save_file({"emb_params": vectors(8)}, str(models / "embeddings" / "neg" / "easynegative.safetensors"))
    save_file({"emb_params": vectors(2)}, str(models / "embeddings" / "badhand.safetensors"))
    return models


def encode_keys(models: Path, negative: str) -> dict[str, str]:
    folders = Folders(models, models.parent, models.parent / "out")
    [pv] = prepare(load_workflow(WORKFLOWS / "embeddings.yaml"), [("negative", negative)], [], folders)
    nodes = make_plan(pv.bound, FingerprintIndex()).nodes
    return {name: nodes[name].key for name in ("positive", "negative")}


@pytest.mark.slow
def test_cache_key_holds_the_named_embeddings_fingerprints(tmp_path):
    models = make_models(tmp_path)
    first = encode_keys(models, "embedding:easynegative, blurry")
    assert encode_keys(models, "embedding:easynegative, blurry") == first
    neg = models / "embeddings" / "neg" / "easynegative.safetensors"
    save_file({"emb_params": vectors(8, seed=99)}, str(neg))
    changed = encode_keys(models, "embedding:easynegative, blurry")
    assert changed["negative"] != first["negative"] and changed["positive"] == first["positive"]
    # a file the prompt does not name changes nothing
    save_file({"emb_params": vectors(2, seed=98)}, str(models / "embeddings" / "badhand.safetensors"))
    assert encode_keys(models, "embedding:easynegative, blurry") == changed


@pytest.mark.slow
def test_missing_embedding_is_a_validation_error_listing_the_folder(tmp_path):
    models = make_models(tmp_path)
    result = run_cli("validate", str(WORKFLOWS / "embeddings.yaml"), "--models-dir", str(models),
                     "--set", "negative=blurry, embedding:easynegativ")
    assert result.rc == 2
    message = result.err + result.out
    assert "negative" in message and "embedding:easynegativ" in message and "blurry" in message
    assert "badhand.safetensors" in message and "neg/easynegative.safetensors" in message


@pytest.mark.slow
def test_embeddings_workflow_runs_with_a_real_layout_file(tmp_path):
    models = make_models(tmp_path)
    result = run_cli("run", str(WORKFLOWS / "embeddings.yaml"), *SMALL, "--models-dir", str(models),
                     "--output-dir", str(tmp_path / "out"), "--no-cache",
                     "--set", "negative=(embedding:neg/easynegative:1.2), embedding:badhand, blurry")
    assert result.rc == 0, result.err
    assert "embedding:neg/easynegative: 8 vector(s)" in result.err + result.out
