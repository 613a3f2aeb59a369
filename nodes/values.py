"""The values that travel along SD sockets, and their disk serializers.

MODEL, CLIP, VAE and UPSCALE_MODEL carry *recipes* (which file, which patches — LoRAs, merges with other
recipes, hypernetworks — which clip layer), never weights:
the weights are built on first use by nodes/models.py. That keeps these values tiny, hashable and
cheap to pass around, and lets a cache hit downstream skip loading a model entirely.

CONDITIONING, LATENT, IMAGE and MASK carry MLX arrays and are stored on disk as `.npz` bytes (float32
round-trips exactly; no pickle).

Conventions (docs/CONTRACTS.md): latents are NHWC and *unscaled* (VAE space; sampling applies 0.18215);
IMAGE is NHWC float32 in [0, 1] like ComfyUI's IMAGE; MASK is [B, H, W] float32 in [0, 1].
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import mlx.core as mx
import numpy as np

from graph import socket_type
from graph.fingerprint import FingerprintIndex
from sd.merge.rules import MergeRule


@dataclass(frozen=True)
class FileRef:
    """A file a model comes from: its path and its identity, the engine's fingerprint of it (size, mtime and
    content hash, graph/fingerprint.py): the same string the node's cache key holds, and what the model
    store (nodes/models.py) keys weights by. A touched or changed file gets a new identity."""

    path: Path
    identity: str

    @classmethod
    def of(cls, path: str | Path, fingerprint: Callable[[Path], str] | None = None) -> FileRef:
        """`fingerprint`: the run's (a node's `ctx.fingerprint`, whose hashes are remembered); without it the
        file is hashed here."""
        p = Path(path).resolve()
        return cls(p, (fingerprint or FingerprintIndex().fingerprint)(p))

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class LoRAPatch:
    lora: FileRef
    strength: float
    allow_partial: bool = False  # apply the layers that match even if some do not


@dataclass(frozen=True)
class SamplingPatch:
    """How sampling reads the UNet: its prediction type ("eps", "v_prediction", "lcm", "x0") and whether the
    schedule is rescaled to zero terminal SNR (ComfyUI's ``model_sampling`` object patch). Not weights."""

    prediction: str = "eps"
    zsnr: bool = False


@dataclass(frozen=True)
class MergePatch:
    """Another recipe's weights (its own patches applied) merged in with `rule` (sd/merge/rules.py): ComfyUI's
    ModelMerge*/CLIPMerge* nodes. Only the other's *weights* come along, as in ComfyUI (not its
    hypernetworks)."""

    other: Union[ModelRecipe, ClipRecipe]  # noqa: UP007 - a forward reference to the recipes below
    rule: MergeRule


@dataclass(frozen=True)
class HypernetworkPatch:
    """An A1111 hypernetwork on the UNet's attention k/v inputs (sd/hypernetwork), at `strength`."""

    hypernetwork: FileRef
    strength: float


@dataclass(frozen=True)
class GuidancePatch:
    """A model patch that is maths, not weights (ComfyUI's RescaleCFG, FreeU_V2, SelfAttentionGuidance,
    PerturbedAttentionGuidance): the node's name and its settings; nodes/model_patches.py turns it into
    sd.sampling's patches when sampling."""

    kind: str
    settings: tuple[tuple[str, float], ...] = ()

    def setting(self, name: str) -> float:
        return dict(self.settings)[name]


@dataclass(frozen=True)
class ModelRecipe:
    """MODEL: a checkpoint's UNet plus patches in order: LoRAs (W + strength * delta) and merges rewrite the
    weights, one after the other; hypernetworks patch the attention of the weights that result. `sampling`:
    the model sampling KSampler uses (detected from the checkpoint, or set by ModelSamplingDiscrete);
    `guidance`: patches applied in order when it samples (RescaleCFG, FreeU_V2, SAG, PAG; no weights)."""

    checkpoint: FileRef
    patches: tuple[LoRAPatch | MergePatch | HypernetworkPatch, ...] = ()
    sampling: SamplingPatch = SamplingPatch()
    sampling_patches: tuple[GuidancePatch, ...] = ()

    def with_lora(self, lora: FileRef, strength: float, allow_partial: bool = False) -> ModelRecipe:
        if strength == 0:
            return self  # a zero strength is a pass-through, and must not change the identity
        return replace(self, patches=self.patches + (LoRAPatch(lora, strength, allow_partial),))

    def with_patch(self, patch: MergePatch | HypernetworkPatch) -> ModelRecipe:
        if isinstance(patch, MergePatch) and patch.rule.is_identity:
            return self  # e.g. ratio 1: every weight stays this model's
        if isinstance(patch, HypernetworkPatch) and patch.strength == 0:
            return self  # k + net(k) * 0 is k
        return replace(self, patches=self.patches + (patch,))

    @property
    def weight_patches(self) -> tuple[LoRAPatch | MergePatch, ...]:
        return tuple(p for p in self.patches if not isinstance(p, HypernetworkPatch))
    def with_sampling_patch(self, kind: str, **settings: float) -> ModelRecipe:
        patch = GuidancePatch(kind, tuple(sorted(settings.items())))
        return replace(self, sampling_patches=self.sampling_patches + (patch,))


@dataclass(frozen=True)
class ClipRecipe:
    """CLIP: a checkpoint's text encoder, its patches (LoRAs, merges) and the layer to stop at (-1 = last)."""

    checkpoint: FileRef
    patches: tuple[LoRAPatch | MergePatch, ...] = ()
    stop_at_layer: int = -1

    def with_lora(self, lora: FileRef, strength: float, allow_partial: bool = False) -> ClipRecipe:
        if strength == 0:
            return self
        return replace(self, patches=self.patches + (LoRAPatch(lora, strength, allow_partial),))

    def with_patch(self, patch: MergePatch) -> ClipRecipe:
        if patch.rule.is_identity:
            return self
        return replace(self, patches=self.patches + (patch,))

    @property
    def weight_patches(self) -> tuple[LoRAPatch | MergePatch, ...]:
        return self.patches


VAE_SOURCES = ("checkpoint", "vae_file")


@dataclass(frozen=True)
class VaeRecipe:
    """VAE: the autoencoder of a file, named with its source: "checkpoint" (the `first_stage_model.*` part
    of a checkpoint, LoadCheckpoint) or "vae_file" (a standalone VAE file from models/vae in any layout
    sd/loading/vae_file.py reads, VAELoader). `checkpoint` is the file in either case."""

    checkpoint: FileRef
    source: str = "checkpoint"

    def __post_init__(self) -> None:
        if self.source not in VAE_SOURCES:
            raise ValueError(f"VAE source {self.source!r} is not one of {VAE_SOURCES}")


@dataclass(frozen=True)
class UpscaleModelRecipe:
    """UPSCALE_MODEL: an upscale model file (ESRGAN, Real-ESRGAN Compact); nodes/models.py builds it."""

    file: FileRef


def _frozen(options: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(options or {}))


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One entry of a CONDITIONING: a text encoding cond [B, 77*k, C], its pooled output [B, C] (float32)
    and options with ComfyUI's keys (read by sd/sampling/conds.py):

        area                (h, w, y, x) in latent pixels, or ("percentage", h, w, y, x)
        strength, mask ([B, H, W] mx.array), mask_strength, set_area_to_bounds
        start_percent, end_percent

    Later per-entry extras go here too, by the key ComfyUI uses (`control`, `concat_latent_image`,
    `concat_mask`, `gligen`); a value the disk store cannot write needs an `register_option_codec`. Options
    are read-only; `with_options` returns a new entry."""

    cond: mx.array
    pooled: mx.array | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.options, MappingProxyType):
            object.__setattr__(self, "options", _frozen(self.options))

    def with_options(self, **changes: Any) -> CondEntry:
        """A copy with options set (a value of None removes the key)."""
        options = {**self.options, **changes}
        return replace(self, options={k: v for k, v in options.items() if v is not None})

    @property
    def nbytes(self) -> int:
        arrays = [self.cond, self.pooled, *(v for v in self.options.values() if isinstance(v, mx.array))]
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass(frozen=True, eq=False, init=False)
class Conditioning:
    """CONDITIONING: entries (ComfyUI's list of [cond, options]). `Conditioning(cond, pooled)` is the one
    entry a prompt encodes to; `Conditioning(entries=...)` any list. `.cond` / `.pooled` are the first
    entry's (what ComfyUI's nodes read as `conditioning[0][0]`)."""

    entries: tuple[CondEntry, ...]

    def __init__(self, cond: mx.array | None = None, pooled: mx.array | None = None, *,
                 entries: Sequence[CondEntry] | None = None):
        if entries is None:
            if cond is None:
                raise ValueError("a conditioning needs a cond array or entries")
            entries = (CondEntry(cond, pooled),)
        elif cond is not None or pooled is not None:
            raise ValueError("give a cond array or entries, not both")
        object.__setattr__(self, "entries", tuple(entries))

    @property
    def cond(self) -> mx.array:
        return self.entries[0].cond

    @property
    def pooled(self) -> mx.array | None:
        return self.entries[0].pooled

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def map(self, change: Callable[[CondEntry], CondEntry]) -> Conditioning:
        """Every entry changed by `change` (how ComfyUI's ConditioningSet* nodes work)."""
        return Conditioning(entries=[change(e) for e in self.entries])

    def with_options(self, **changes: Any) -> Conditioning:
        return self.map(lambda e: e.with_options(**changes))

    def for_sampling(self) -> list[tuple[mx.array, Mapping[str, Any]]]:
        """(cond, options) pairs, what sd.sampling takes."""
        return [(e.cond, e.options) for e in self.entries]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class Latent:
    """A batch of latents, NHWC [B, h, w, 4], unscaled. `batch_index` and `noise_mask` mirror
    ComfyUI's optional LATENT fields; `noise_mask` is a MASK [B, H, W] (1 = change) at any resolution
    (ComfyUI keeps [B, 1, H, W]): the samplers resize it to the latent (nodes/inpaint.py)."""

    samples: mx.array
    batch_index: tuple[int, ...] | None = None
    noise_mask: mx.array | None = field(default=None)

    @property
    def nbytes(self) -> int:
        return self.samples.nbytes + (self.noise_mask.nbytes if self.noise_mask is not None else 0)


# --- serializers ----------------------------------------------------------------------------------

def _npz(arrays: dict[str, mx.array | None], meta: dict | None = None) -> bytes:
    data = {k: _to_numpy(v) for k, v in arrays.items() if v is not None}
    data["__meta__"] = np.frombuffer(json.dumps(meta or {}).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **data)
    return buf.getvalue()


def _check_npz(blob: bytes) -> None:
    """Refuse, before anything is allocated, an archive that could decode to more than it holds: what
    np.savez writes is uncompressed members whose .npy header's shape and dtype account for exactly the
    member's bytes (a forged 8 MB deflated entry once decoded to 16 GB)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(blob):
                raise ValueError(f"cache blob member {info.filename!r} is compressed or larger than the blob")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                if dtype.hasobject:
                    raise ValueError(f"cache blob member {info.filename!r} holds Python objects")
                need = math.prod(shape) * dtype.itemsize
                if need != info.file_size - f.tell():
                    raise ValueError(f"cache blob member {info.filename!r} claims {need} bytes, holds "
                                     f"{info.file_size - f.tell()}")


def _from_npz(blob: bytes) -> tuple[dict[str, mx.array], dict]:
    _check_npz(blob)
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        arrays = {k: mx.array(z[k]) for k in z.files if k != "__meta__"}
    return arrays, meta


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        a = a.astype(mx.float32)
    return np.array(a)


# Option values that are neither arrays nor JSON data are written by a codec registered for their key:
# encode(value) -> (JSON data, {name: array}), decode(data, arrays) -> value.
OptionCodec = tuple[Callable[[Any], tuple[Any, dict[str, mx.array]]],
                    Callable[[Any, dict[str, mx.array]], Any]]
OPTION_CODECS: dict[str, OptionCodec] = {}


def register_option_codec(key: str, encode, decode) -> None:
    """Let the disk store keep conditioning entries whose option `key` holds a non-JSON value (a ControlNet
    recipe, say). Without one, such a conditioning stays in memory only."""
    OPTION_CODECS[key] = (encode, decode)


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_is_json(v) for v in value)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def conditioning_to_bytes(c: Conditioning) -> bytes:
    arrays: dict[str, mx.array | None] = {}
    entries = []
    for i, e in enumerate(c.entries):
        arrays[f"{i}.cond"], arrays[f"{i}.pooled"] = e.cond, e.pooled
        options: dict[str, Any] = {}
        for key, value in sorted(e.options.items()):
            if key in OPTION_CODECS:
                data, parts = OPTION_CODECS[key][0](value)
                options[key] = {"codec": data, "arrays": sorted(parts)}
                arrays.update({f"{i}.opt.{key}.{name}": a for name, a in parts.items()})
            elif isinstance(value, mx.array):
                options[key] = {"array": True}
                arrays[f"{i}.opt.{key}"] = value
            elif _is_json(value):
                options[key] = {"value": value}
            else:
                raise ValueError(f"conditioning option {key!r} ({type(value).__name__}) has no disk codec")
        entries.append(options)
    return _npz(arrays, {"entries": entries})


def conditioning_from_bytes(blob: bytes) -> Conditioning:
    arrays, meta = _from_npz(blob)
    if "entries" not in meta:  # written before conditionings had entries
        return Conditioning(arrays["cond"], arrays.get("pooled"))
    entries = []
    for i, opts in enumerate(meta["entries"]):
        options = {}
        for key, spec in opts.items():
            if "codec" in spec:
                if key not in OPTION_CODECS:
                    raise ValueError(f"no codec for conditioning option {key!r}")
                parts = {name: arrays[f"{i}.opt.{key}.{name}"] for name in spec["arrays"]}
                options[key] = OPTION_CODECS[key][1](spec["codec"], parts)
            elif spec.get("array"):
                options[key] = arrays[f"{i}.opt.{key}"]
            else:
                options[key] = _tuples(spec["value"])
        entries.append(CondEntry(arrays[f"{i}.cond"], arrays.get(f"{i}.pooled"), options))
    return Conditioning(entries=entries)


def latent_to_bytes(latent: Latent) -> bytes:
    meta = {"batch_index": list(latent.batch_index) if latent.batch_index is not None else None}
    return _npz({"samples": latent.samples, "noise_mask": latent.noise_mask}, meta)


def latent_from_bytes(blob: bytes) -> Latent:
    arrays, meta = _from_npz(blob)
    index = meta.get("batch_index")
    return Latent(arrays["samples"], tuple(index) if index is not None else None, arrays.get("noise_mask"))


def array_to_bytes(a: mx.array) -> bytes:
    return _npz({"array": a})


def array_from_bytes(blob: bytes) -> mx.array:
    return _from_npz(blob)[0]["array"]


def register_socket_types() -> None:
    socket_type("CONDITIONING", to_bytes=conditioning_to_bytes, from_bytes=conditioning_from_bytes)
    socket_type("LATENT", to_bytes=latent_to_bytes, from_bytes=latent_from_bytes)
    socket_type("IMAGE", to_bytes=array_to_bytes, from_bytes=array_from_bytes)
    socket_type("MASK", to_bytes=array_to_bytes, from_bytes=array_from_bytes)
    socket_type("UPSCALE_MODEL")  # a recipe: memory cache only


register_socket_types()
