"""GLIGENLoader and GLIGENTextBoxApply (ComfyUI's nodes.py): boxes that place what a text names.

GLIGEN (a socket of its own) is a recipe, the file; its weights are read when a sampler first needs them.
GLIGENTextBoxApply puts ComfyUI's option `gligen` = ("position", model, [(pooled, h, w, y, x), ...]) on every
entry of a conditioning (sizes in latent pixels; each application appends a box), as `GligenBoxes`. A
sampler turns it into `sd.gligen.GligenSource` through the entry resolver registered here, so the gated
attention runs inside the UNet forward for that entry's calls (sd/models/unet_extras.py, `middle_patch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from graph import CLIP, CONDITIONING, Int, String, node, socket_type
from nodes import models
from nodes.conditioning import CLIPEncode, Prompt
from nodes.latents import MAX_RESOLUTION
from nodes.paths import MODEL_EXTENSIONS, prompt_embedding_files, resolve
from nodes.sampling import register_entry_resolver
from nodes.values import FileRef, register_option_codec

GLIGEN = socket_type("GLIGEN")  # a recipe: memory cache only


@dataclass(frozen=True)
class GligenRecipe:
    """GLIGEN: a GLIGEN file (models/gligen)."""

    file: FileRef


@dataclass(frozen=True, eq=False)
class GligenBoxes:
    """The `gligen` option of an entry: ComfyUI's ("position", model, boxes), each box (pooled [1, C], h, w,
    y, x) in latent pixels. Compared by identity (it holds arrays)."""

    model: GligenRecipe
    boxes: tuple[tuple[mx.array, int, int, int, int], ...]
    kind: str = "position"


def resolve_gligen(name: str, folders) -> Path:
    folder = Path(folders.models_dir) / "gligen"
    return resolve(name, folder, "GLIGEN model", MODEL_EXTENSIONS, "--models-dir")


def gligen_file(name: str, folders) -> Path:
    """The file, its header checked (a file that is no GLIGEN file fails at validation)."""
    from sd.errors import SDGraphError
    from sd.gligen import gligen_key_dim

    path = resolve_gligen(name, folders)
    try:
        gligen_key_dim(path)
    except SDGraphError as e:
        raise ValueError(str(e)) from e
    return path


@node(category="loaders", outputs=(GLIGEN,), reads_files={"gligen_name": gligen_file})
def GLIGENLoader(gligen_name: String(), ctx=None):
    """Load a GLIGEN model from models/gligen (ComfyUI's GLIGENLoader).

    E.g. gligen_sd14_textbox_pruned: its position net and one gated self-attention per UNet transformer
    block, sizes read off the shapes.
    `.safetensors`, or `.ckpt`/`.pt` read safely; the weights load when a sampler first uses them."""
    from sd.gligen import gligen_key_dim

    ref = FileRef.of(resolve_gligen(gligen_name, ctx.folders), ctx.fingerprint)
    ctx.log(f"GLIGEN {ref.name}: boxes carry {gligen_key_dim(ref.path)}-wide text features")
    return GligenRecipe(ref)


@node(category="conditioning/gligen", outputs=(CONDITIONING,), reads_files={"text": prompt_embedding_files})
def GLIGENTextBoxApply(conditioning_to: CONDITIONING, clip: CLIP, gligen_textbox_model: GLIGEN,
                       text: Prompt(multiline=True), width: Int(8, MAX_RESOLUTION) = 64,
                       height: Int(8, MAX_RESOLUTION) = 64, x: Int(0, MAX_RESOLUTION) = 0,
                       y: Int(0, MAX_RESOLUTION) = 0, ctx=None):
    """Place what `text` names in a box of the image (ComfyUI's GLIGENTextBoxApply).

    The box is width x height pixels at x, y (floored to multiples of 8), on every entry of the
    conditioning. The text's pooled CLIP output and the box
    become one GLIGEN token; applying the node again adds a box (at most 30). Works best when the text is
    an object the prompt mentions."""
    from sd.gligen import gligen_key_dim

    pooled = CLIPEncode(clip, text, ctx=ctx).pooled
    key_dim = gligen_key_dim(gligen_textbox_model.file.path)
    if pooled.shape[-1] != key_dim:
        raise ValueError(f"{gligen_textbox_model.file.name} takes {key_dim}-wide text features; this text "
                         f"encoder's pooled output is {pooled.shape[-1]} wide (a GLIGEN file for another "
                         "model?)")
    box = (pooled, height // 8, width // 8, y // 8, x // 8)

    def add_box(entry):
        previous = entry.options.get("gligen")
        boxes = previous.boxes if isinstance(previous, GligenBoxes) else ()
        if len(boxes) >= 30:
            raise ValueError("GLIGEN takes at most 30 boxes per conditioning")
        return entry.with_options(gligen=GligenBoxes(gligen_textbox_model, boxes + (box,)))

    return conditioning_to.map(add_box)


def load(recipe: GligenRecipe, log=lambda msg: None):
    """The file's `sd.gligen.Gligen`, in the UNet's dtype, kept in the model store by file identity."""
    def build():
        from sd.accel.precision import default_dtype
        from sd.gligen import load_gligen

        start = time.perf_counter()
        gligen = load_gligen(recipe.file.path, dtype=default_dtype("unet"))
        models.LOAD_COUNTS["gligen"] += 1
        log(f"loaded GLIGEN from {recipe.file.name} ({time.perf_counter() - start:.2f} s)")
        return gligen

    return models.STORE.get(("gligen", recipe.file.identity), build)


def _source(value: GligenBoxes, ctx):
    from sd.gligen import GligenSource

    return GligenSource(load(value.model, ctx.log), value.boxes)


def _encode(value: GligenBoxes):
    meta = {"kind": value.kind, "file": str(value.model.file.path), "identity": value.model.file.identity,
            "boxes": [list(b[1:]) for b in value.boxes]}
    return meta, {f"pooled.{i}": b[0] for i, b in enumerate(value.boxes)}


def _decode(meta, arrays) -> GligenBoxes:
    boxes = tuple((arrays[f"pooled.{i}"], *(int(v) for v in b)) for i, b in enumerate(meta["boxes"]))
    return GligenBoxes(GligenRecipe(FileRef(Path(meta["file"]), meta["identity"])), boxes, meta["kind"])


register_entry_resolver("gligen", _source)
register_option_codec("gligen", _encode, _decode)

__all__ = ["GLIGEN", "GLIGENLoader", "GLIGENTextBoxApply", "GligenBoxes", "GligenRecipe"]
