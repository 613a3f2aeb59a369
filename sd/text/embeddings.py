"""Textual-inversion embeddings: finding ``embedding:name`` in a folder, and reading its vectors.

Found as ComfyUI's ``load_embed`` finds them: ``name`` joined to the folder and to each of its subfolders
(the folder first, then subfolders in sorted order, where ComfyUI's order is a set's), as written or with
``.safetensors``, ``.pt`` or ``.bin`` appended, never outside the folder.

Layouts read (the first that fits, as ComfyUI picks them):

- A1111 ``.pt``: ``{"string_to_param": {"*": [n, C]}, "name": ..., "step": ...}`` (through the restricted
  unpickler of sd/io: nothing in the file is run);
- ``.safetensors`` with ``emb_params`` [n, C] (A1111/kohya), or SDXL's ``clip_l`` / ``clip_g`` pair, of which
  SD1.x's text encoder (CLIP-L) takes ``clip_l``;
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": [C] or [n, C]}``;
- a list of such dicts (each tensor whose width fits is taken, in order).

The vectors must be as wide as the text encoder's token embedding (768 for SD1.x); an SD2.x (1024) or
CLIP-G-only (1280) embedding is an error, where ComfyUI would skip it with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sd.errors import CheckpointError

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
SD1_KEY = "clip_l"  # ComfyUI's embedding_key for the SD1 tokenizer
MAX_VECTORS = 300  # real embeddings have 1-75; four chunks' worth bounds what a file can add to a prompt


def embedding_folders(folder: str | os.PathLike) -> list[Path]:
    """The folder, then every folder below it (links followed, as ComfyUI, but each real folder once, so a
    link loop ends), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    seen, below = {os.path.realpath(folder)}, []
    for root, dirs, _ in os.walk(folder, followlinks=True):
        for name in list(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if real in seen:
                dirs.remove(name)  # do not descend twice (a symlink back up would never end)
            else:
                seen.add(real)
                below.append(Path(root) / name)
    return [folder, *sorted(below)]


def find_embedding(name: str, folder: str | os.PathLike) -> Path | None:
    """The file ``embedding:name`` means inside ``folder`` (see the module docstring), or None."""
    if not name or "\0" in name:
        return None
    for directory in embedding_folders(folder):
        base = os.path.abspath(directory)
        candidate = os.path.abspath(os.path.join(base, name))
        try:
            if os.path.commonpath((base, candidate)) != base:
                continue  # '../x' must not reach out of the embeddings folder
        except ValueError:
            continue
        for path in (candidate, *(candidate + ext for ext in EMBEDDING_EXTENSIONS)):
            if os.path.isfile(path):
                return Path(path)
    return None


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "read") and hasattr(value, "shape")


def _pick(path: Path, obj: Any, width: int) -> list[Any]:
    """The tensors holding the vectors, as ComfyUI's load_embed chooses them."""
    if isinstance(obj, list):
        picked = [t for entry in obj if isinstance(entry, dict) for t in entry.values()
                  if _is_tensor(t) and len(t.shape) and t.shape[-1] == width]
        if picked:
            return picked
        raise CheckpointError(path, f"the list holds no tensors {width} wide")
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not an embedding's tensors")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        values = list(params.values()) if isinstance(params, dict) else []
        if not values or not _is_tensor(values[0]):
            raise CheckpointError(path, "'string_to_param' holds no tensor")
        return [values[0]]
    if _is_tensor(obj.get(SD1_KEY)):
        return [obj[SD1_KEY]]
    tensors = [v for v in obj.values() if _is_tensor(v)]
    if not tensors:
        raise CheckpointError(path, "holds no tensors: not a textual-inversion embedding")
    return [tensors[0]]


def load_embedding(path: str | os.PathLike, width: int) -> np.ndarray:
    """The embedding's vectors, float32 [n, width]; ``CheckpointError`` naming the file for anything else."""
    from sd.io.checkpoint_io import load_pickled, open_tensors

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(path, f"cannot read the embedding: {e.strerror or e}") from e
    if head.startswith((b"PK", b"\x80")):
        obj = load_pickled(path)
    else:
        tensors = open_tensors(path)
        obj = {key: _Lazy(tensors, key) for key in tensors}
    parts = _pick(path, obj, width)
    for t in parts:
        if len(t.shape) == 0 or len(t.shape) > 2 or t.shape[-1] != width:
            hint = {1024: " (an SD2.x embedding?)", 1280: " (SDXL's CLIP-G only?)"}.get(t.shape[-1] if t.shape
                                                                                        else 0, "")
            raise CheckpointError(path, f"holds vectors of shape {tuple(t.shape)}; this text encoder takes "
                                        f"vectors {width} wide{hint}")
    count = sum(int(np.prod(t.shape[:-1])) for t in parts)
    if not 0 < count <= MAX_VECTORS:
        raise CheckpointError(path, f"holds {count} vectors; an embedding has 1 to {MAX_VECTORS}")
    vectors = np.concatenate([np.asarray(t.read(), dtype=np.float32).reshape(-1, width) for t in parts])
    if not np.isfinite(vectors).all():
        raise CheckpointError(path, "holds vectors that are not finite numbers (NaN or infinity)")
    return vectors


class _Lazy:
    """One tensor of an opened safetensors file, read on demand (the same face as the unpickler's)."""

    def __init__(self, tensors: Any, key: str):
        self._tensors, self._key = tensors, key
        self.shape = tuple(tensors.shape(key))

    def read(self) -> np.ndarray:
        return self._tensors[self._key]
