"""CLIPEncode and CLIPSetLastLayer."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from graph import CLIP, CONDITIONING, Choice, Int, String, node
from nodes import models
from nodes.finite import check_finite
from nodes.paths import find_embedding, prompt_embedding_files
from nodes.values import ClipRecipe, Conditioning


class Prompt(String):
    """A prompt: checked at validation for what would fail or give a black image at run time (length,
    nesting, non-finite weights such as `(x:nan)`)."""

    def check(self, value):
        from sd.text.prompt_weights import PromptError, check_prompt

        value = super().check(value)
        try:
            check_prompt(value)
        except PromptError as e:
            raise ValueError(str(e)) from e
        return value


@node(category="conditioning", outputs=(CONDITIONING,), reads_files={"text": prompt_embedding_files})
def CLIPEncode(clip: CLIP, text: Prompt(multiline=True), weighting: Choice(("comfy", "a1111")) = "comfy",
               ctx=None):
    """Encode a prompt with the text encoder (ComfyUI's CLIPTextEncode; `(word:1.2)` weights work).

    `embedding:name` (or `(embedding:name:1.2)`) puts a textual-inversion embedding from
    models/embeddings in the prompt (subfolders searched, extension optional); a name that is not there
    is a validation error. The embedding files are part of the cache key.

    weighting (sdgraph's) "a1111" reads and applies weights as AUTOMATIC1111 does: (x) x1.1, [x] /1.1,
    (x:w) multiplies, BREAK starts a new 75-token chunk, and each chunk's mean is restored after weighting
    (no embeddings there yet)."""
    from sd.text.a1111_weights import encode_prompt_a1111
    from sd.text.embeddings import load_embedding
    from sd.text.encode import encode_prompt

    recipe: ClipRecipe = clip
    model = models.clip_for(recipe, ctx.log)
    width = model.config.width
    if weighting == "a1111":
        if "embedding:" in text:
            raise ValueError("CLIPEncode: textual-inversion embeddings ('embedding:name') are not supported "
                             "with weighting 'a1111' yet; use weighting 'comfy' or remove them")
        cond, pooled = encode_prompt_a1111(model, text, clip_skip=recipe.stop_at_layer)
    else:

        def embedding(name: str):
            path = find_embedding(name, ctx.folders)
            if path is None:
                return None
            vectors = load_embedding(path, width)
            ctx.log(f"embedding:{name}: {len(vectors)} vector(s) from {path.name}")
            return vectors

        cond, pooled = encode_prompt(model, text, clip_skip=recipe.stop_at_layer, embedding=embedding)
    mx.eval(cond, pooled)  # MLX is lazy: compute here, so the time is this node's
    check_finite(cond, "the prompt's encodings", recipe, "clip")
    return Conditioning(cond, pooled)


@node(category="conditioning", outputs=(CLIP,))
def CLIPSetLastLayer(clip: CLIP, stop_at_clip_layer: Int(-24, -1) = -1):
    """Stop the text encoder at an earlier layer ("clip skip": -2 is the penultimate layer)."""
    recipe: ClipRecipe = clip
    return replace(recipe, stop_at_layer=stop_at_clip_layer)
