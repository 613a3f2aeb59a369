"""Read a LoRA file and group its tensors into per-layer adapters, whatever the format.

Formats recognised by their key spellings:
- kohya LoRA / LoCon: `lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.lora_mid.weight` (Tucker),
  `.alpha`;
  `<name>` is a diffusers- or LDM-style module path with dots replaced by underscores; `lora_te_` for CLIP.
- LyCORIS LoHa (`.hada_w1_a/b`, `.hada_w2_a/b`, `.hada_t1/t2`) and LoKr (`.lokr_w1[_a/_b]`,
  `.lokr_w2[_a/_b]`, `.lokr_t2`), under the same kohya names; `.diff` (full weight difference).
- diffusers / PEFT: `unet.<dotted name>.lora_A.weight` / `.lora_B.weight`,
  `.lora_linear_layer.down/up.weight`,
  the attention-processor form `...attn1.processor.to_q_lora.down.weight` (`to_out_lora` = `to_out.0`),
  `text_encoder.<dotted name>...`; optional `.alpha`.
- DoRA: `.dora_scale` (LyCORIS/kohya: (1, I, ...) per input or (O, 1, ...) per output channel) or
  `.lora_magnitude_vector[.weight]` (PEFT: always per output channel) next to any of the above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd.errors import CheckpointError, LoRAError

UNET, TEXT_ENCODER = "unet", "text_encoder"

# (key prefix, component, names use underscores instead of dots)
_COMPONENT_PREFIXES = (
    ("lora_unet_", UNET, True),
    ("lora_te_", TEXT_ENCODER, True),
    ("unet.", UNET, False),
    ("text_encoder.", TEXT_ENCODER, False),
    ("model.diffusion_model.", UNET, False),
    ("diffusion_model.", UNET, False),
    ("cond_stage_model.transformer.", TEXT_ENCODER, False),
)

# Prefixes that only other architectures use: refused with a clear message instead of "unmatched".
_FOREIGN_PREFIXES = {
    "lora_te1_": "SDXL (two text encoders)",
    "lora_te2_": "SDXL (two text encoders)",
    "text_encoder_2.": "SDXL (two text encoders)",
    "lora_transformer_": "a DiT model (Flux/SD3)",
    "transformer.": "a DiT model (Flux/SD3)",
}

# Key suffix -> role of the tensor within its layer's adapter. Longest suffixes are tried first.
_ROLE_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".diff": "diff",
    **{f".hada_{r}": f"hada_{r}" for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{r}": f"lokr_{r}" for r in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
}
# Old diffusers text-encoder attention-processor names -> CLIP layer names.
_OLD_TEXT_ENCODER_NAMES = (
    (".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out", ".out_proj"))
_SUFFIXES_LONGEST_FIRST = sorted(_ROLE_SUFFIXES, key=len, reverse=True)

# Sets of roles that make a complete adapter of each kind.
_KIND_REQUIRED = {
    "lora": ({"up", "down"},),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
    "lokr": ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}),  # and one of the w2 sets, checked below
    "full": ({"diff"},),
}
_LOKR_W2_SETS = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})


@dataclass(frozen=True)
class LoRAModule:
    """The adapter tensors of one layer, as found in the file."""

    key: str  # the layer's key prefix in the file, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    component: str  # UNET or TEXT_ENCODER
    name: str  # the layer name after the component prefix, in the file's spelling
    underscored: bool  # kohya names: dots replaced by underscores
    kind: str  # "lora" (incl. LoCon), "loha", "lokr" or "full"
    tensors: Mapping[str, np.ndarray] = field(repr=False)  # role -> array (torch layout)
    alpha: float | None = None
    dora_scale: np.ndarray | None = field(default=None, repr=False)

    def dotted_candidates(self) -> list[str]:
        """Dotted spellings to look up: diffusers' attention-processor names map onto plain layer names."""
        name = self.name.replace(".processor.", ".")
        candidates = [name]
        if name.endswith(".to_out"):
            candidates.append(name + ".0")
        if self.component == TEXT_ENCODER and not name.startswith("text_model."):
            candidates.append("text_model." + name)  # transformers 5 drops the text_model level
        if self.component == TEXT_ENCODER:  # old diffusers text-encoder processors: to_q -> q_proj
            for old, new in _OLD_TEXT_ENCODER_NAMES:
                if name.endswith(old):
                    candidates.append(name[: -len(old)] + new)
        return candidates


@dataclass(frozen=True)
class ParsedLoRA:
    modules: tuple[LoRAModule, ...]
    unrecognised: tuple[str, ...]  # keys that fit no known format


def read_tensors(path: str | Path) -> Mapping[str, np.ndarray]:
    """All tensors of a LoRA file as numpy arrays in torch layout (via the project's safe reader, so
    `.ckpt`/`.pt` pickles are never executed); any failure -> LoRAError naming the file."""
    from sd.io.checkpoint_io import open_tensors

    try:
        tensors = open_tensors(path)
        return {key: np.asarray(tensors[key]) for key in tensors}
    except CheckpointError as exc:
        reason = str(exc).removeprefix(f"{exc.path}: ")
        raise LoRAError(path, f"cannot read this LoRA file: {reason}. If it was downloaded, it may be "
                              "truncated or corrupted: download it again") from exc
    except Exception as exc:  # arrays that fail to materialise (short data) surface as library errors
        raise LoRAError(path, f"cannot read this LoRA file ({type(exc).__name__}: {exc}); it may be "
                              "truncated or corrupted: download it again") from exc


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix):
            return key[: -len(suffix)], _ROLE_SUFFIXES[suffix]
    return None


def _component_of(layer_key: str) -> tuple[str, str, bool] | None:
    for prefix, component, underscored in _COMPONENT_PREFIXES:
        if layer_key.startswith(prefix):
            return component, layer_key[len(prefix):], underscored
    return None


def _kind_of(roles: set[str]) -> str | None:
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "diff" in roles:
        return "full"
    if roles & {"up", "down", "mid"}:
        return "lora"
    return None


def _check_complete(path: str, layer_key: str, kind: str, roles: set[str]) -> None:
    def missing_message(required: set[str]) -> str:
        return ", ".join(sorted(required - roles))

    options = _KIND_REQUIRED[kind]
    if not any(req <= roles for req in options):
        raise LoRAError(path, f"layer '{layer_key}' ({kind}) lacks tensor(s) {missing_message(options[0])}; "
                              "the file is incomplete or in an unsupported variant")
    if kind == "lokr" and not any(req <= roles for req in _LOKR_W2_SETS):
        raise LoRAError(path, f"layer '{layer_key}' (lokr) lacks lokr_w2 or lokr_w2_a/lokr_w2_b")


def _rank_pair(path: str, layer_key: str, a_role: str, a: np.ndarray, b_role: str, b: np.ndarray) -> None:
    """`a @ b` must chain: a's inner dimension (columns) equals b's rank (rows)."""
    if a.ndim < 2 or b.ndim < 2 or a.shape[1] != b.shape[0]:
        raise LoRAError(path, f"layer '{layer_key}': rank mismatch, {a_role} has shape {tuple(a.shape)} but "
                              f"{b_role} has shape {tuple(b.shape)} (inner dimensions must agree); the file "
                              "is malformed")


def _check_ranks(path: str, layer_key: str, kind: str, t: Mapping[str, np.ndarray]) -> None:
    if kind == "lora":
        down = t["down"]
        if "mid" in t:  # Tucker LoCon: up (O,r,1,1), mid (r,r,kh,kw), down (r,I,1,1)
            _rank_pair(path, layer_key, "lora_up", t["up"], "lora_mid", t["mid"])
            if t["mid"].shape[1] != down.shape[0]:
                raise LoRAError(path, f"layer '{layer_key}': rank mismatch, lora_mid has shape "
                                      f"{tuple(t['mid'].shape)} but lora_down has shape {tuple(down.shape)}")
        else:
            _rank_pair(path, layer_key, "lora_up", t["up"], "lora_down", down)
    elif kind == "loha":
        for i in ("1", "2"):
            a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            if f"hada_t{i}" in t:  # Tucker: t (r,r,kh,kw), a (r,O), b (r,I)
                if a.shape[0] != t[f"hada_t{i}"].shape[0] or b.shape[0] != t[f"hada_t{i}"].shape[1]:
                    raise LoRAError(path, f"layer '{layer_key}': rank mismatch between hada_t{i}, "
                                          f"hada_w{i}_a and hada_w{i}_b")
            else:
                _rank_pair(path, layer_key, f"hada_w{i}_a", a, f"hada_w{i}_b", b)
    elif kind == "lokr":
        if "lokr_w1_a" in t:
            _rank_pair(path, layer_key, "lokr_w1_a", t["lokr_w1_a"], "lokr_w1_b", t["lokr_w1_b"])
        if "lokr_w2_a" in t and "lokr_t2" not in t:
            _rank_pair(path, layer_key, "lokr_w2_a", t["lokr_w2_a"], "lokr_w2_b", t["lokr_w2_b"])


def parse_lora(tensors: Mapping[str, np.ndarray], path: str | Path) -> ParsedLoRA:
    """Group a LoRA file's tensors by layer and validate them. Raises LoRAError on malformed layers."""
    path = str(path)
    layers: dict[str, dict[str, np.ndarray]] = {}
    unrecognised = []
    for key in tensors:
        for prefix, arch in _FOREIGN_PREFIXES.items():
            if key.startswith(prefix):
                raise LoRAError(path, f"key '{key}' shows this LoRA is for {arch}, not Stable Diffusion 1.x; "
                                      "use a LoRA trained for SD1.5")
        split = _split_key(key)
        if split is None or _component_of(split[0]) is None:
            unrecognised.append(key)
            continue
        layer_key, role = split
        layers.setdefault(layer_key, {})[role] = tensors[key]

    modules = []
    for layer_key, found in layers.items():
        roles = set(found)
        kind = _kind_of(roles)
        if kind is None:  # only alpha / dora_scale without weights: dead keys
            unrecognised.extend(f"{layer_key} ({role})" for role in sorted(roles))
            continue
        _check_complete(path, layer_key, kind, roles)
        arrays = {r: np.asarray(a, dtype=np.float32) for r, a in found.items()
                  if r not in ("alpha", "dora_scale", "magnitude")}
        _check_ranks(path, layer_key, kind, arrays)
        component, name, underscored = _component_of(layer_key)
        alpha = float(np.asarray(found["alpha"], np.float64).reshape(-1)[0]) if "alpha" in found else None
        dora = np.asarray(found["dora_scale"], dtype=np.float32) if "dora_scale" in found else None
        if "magnitude" in found:
            # PEFT's magnitude is always per output channel, even where it is stored as (1, O, 1, 1) for
            # convs; store it the unambiguous LyCORIS way, (O, 1).
            dora = np.asarray(found["magnitude"], dtype=np.float32).reshape(-1, 1)
        modules.append(LoRAModule(layer_key, component, name, underscored, kind, arrays, alpha, dora))
    if not modules:
        raise LoRAError(path, f"no LoRA layers found (first keys: {', '.join(list(tensors)[:3]) or 'none'}); "
                              "this does not look like a LoRA file")
    return ParsedLoRA(tuple(modules), tuple(unrecognised))
