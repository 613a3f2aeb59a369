"""Load an SD1.x single-file checkpoint into MLX modules, strictly.

Keys are split into UNet / VAE / text encoder by their LDM prefixes; each part present is built from a
config read off its shapes, checked key-for-key and shape-for-shape against the module *before* any
weight is assigned (so no module is ever half-random), converted (convs OIHW -> OHWI, dtype) and
evaluated once. Parts missing from the file stay None; `require_*` then says so clearly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from sd.accel.precision import COMPONENTS, default_dtype, on_gpu, parse_dtype
from sd.errors import CheckpointError, MissingComponentError
from sd.io.checkpoint_io import open_tensors
from sd.loading.detect import check_family, detect_unet_config

if TYPE_CHECKING:  # the VAE and CLIP modules are imported only when a file has those parts
    from sd.models.clip import CLIPTextConfig, CLIPTextModel
    from sd.models.unet import UNetConfig, UNetModel
    from sd.models.vae import AutoencoderKL, VAEConfig

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
}
LABELS = {"unet": "UNet", "vae": "VAE", "clip": "text encoder (CLIP)"}

_CLIP_MODEL_PREFIX = "text_model."
# LatentDiffusion's noise-schedule buffers: saved at the top level (some tools add 'model.'), never used.
_DDPM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
    "v_pred", "ztsnr",  # empty prediction-type markers (sd/loading/prediction.py reads them)
})
_IGNORED_PREFIXES = (
    "model_ema.",  # EMA copy of the UNet (names with dots removed); the plain weights are what loads
    "first_stage_model.loss.",  # VAE training losses (LPIPS / discriminator) in some training dumps
)
# The CLIP position_ids buffer: a constant arange, stored as int64, float or not at all.
_IGNORED_CLIP_KEYS = frozenset({"text_model.embeddings.position_ids"})

V = TypeVar("V")


def _is_ignored(key: str) -> bool:
    if key.startswith(_IGNORED_PREFIXES):
        return True
    name = key.removeprefix("model.")
    return name in _DDPM_BUFFERS


def split_components(keys_or_mapping: Mapping[str, V] | Iterable[str]) -> dict[str, dict[str, Any]]:
    """Sort checkpoint keys into {"unet", "vae", "clip", "ignored", "unknown"}.

    Component entries map the prefix-stripped (and normalised) key to the mapping's value, or to the
    original key when given plain keys. "ignored" holds known harmless extras (EMA copies, DDPM
    buffers, CLIP position_ids); "unknown" whatever is left, keyed by the original key.
    Older files store the text encoder without 'text_model.' (pre-4.x transformers): it is added.
    """
    is_mapping = isinstance(keys_or_mapping, Mapping)
    parts: dict[str, dict[str, Any]] = {name: {} for name in (*COMPONENTS, "ignored", "unknown")}
    for key in keys_or_mapping:
        value = keys_or_mapping[key] if is_mapping else key
        part = next((p for p, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if part is None:
            parts["ignored" if _is_ignored(key) else "unknown"][key] = value
            continue
        name = key[len(PREFIXES[part]):]
        if part == "clip" and not name.startswith(_CLIP_MODEL_PREFIX):
            name = _CLIP_MODEL_PREFIX + name
        if (part == "clip" and name in _IGNORED_CLIP_KEYS) or _is_ignored(key):
            parts["ignored"][key] = value
        else:
            parts[part][name] = value
    return parts


def _abbreviate(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} (and {len(items) - limit} more, {len(items)} in all)" if len(items) > limit else shown


def _mlx_layout(shape: tuple) -> tuple:
    """PyTorch OIHW conv shape -> MLX OHWI; other shapes unchanged."""
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


def _torch_layout(shape: tuple) -> tuple:
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape)


def _fmt(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_weights_match(path: object, part: str, expected: Mapping[str, tuple],
                        file_shapes: Mapping[str, tuple]) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (full checkpoint names).

    `expected` are the module's parameter shapes (MLX layout), `file_shapes` the file's (PyTorch layout).
    """
    prefix = PREFIXES[part]
    missing = [prefix + k for k in expected if k not in file_shapes]
    unexpected = [prefix + k for k in file_shapes if k not in expected]
    misshaped = [f"{prefix}{k} (file {_fmt(file_shapes[k])}, expected {_fmt(_torch_layout(shape))})"
                 for k, shape in expected.items()
                 if k in file_shapes and _mlx_layout(file_shapes[k]) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_abbreviate(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_abbreviate(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} with the wrong shape: {_abbreviate(misshaped)}")
    if problems:
        raise CheckpointError(path, f"{LABELS[part]} weights do not fit the architecture read from the file: "
                                    + "; ".join(problems)
                                    + ". The file is damaged, edited, or a model variant sdgraph does not "
                                    "support.")


def _to_mlx(array: np.ndarray | mx.array, dtype: mx.Dtype) -> mx.array:
    # conv weights OIHW -> OHWI, made contiguous here: a transposed view keeps its strides, and every op that
    # needs the weight contiguous (a conv GEMM's reshape) would copy it again on every call
    if isinstance(array, np.ndarray):
        if array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
        weight = mx.array(array)
    else:  # read by MLX (a GPU): the device transposes
        weight = mx.contiguous(array.transpose(0, 2, 3, 1)) if array.ndim == 4 else array
    return weight if weight.dtype == dtype else weight.astype(dtype)


_MLX_READABLE = ("float16", "bfloat16", "float32")


def _tensor_source(tensors, keys: Iterable[str], mlx_reads: bool) -> Callable[[str], np.ndarray | mx.array]:
    """How `_build` reads each tensor. On a GPU (`mlx_reads`), a safetensors file whose header our reader has
    checked, for `keys` that are all float16/bfloat16/float32, is read by MLX's own loader (`mx.load`: lazy,
    one read per tensor straight into the array); a new process copying memory-mapped pages instead spent
    1.5 s on a full-size UNet (docs/performance.md, "Cold start"). Anything else, and the CPU (where
    MLX's transposes are slower than numpy's), goes through the numpy reader, the reference."""
    if not (mlx_reads and getattr(tensors, "format", None) == "safetensors"
            and all(tensors.stored_dtype(k) in _MLX_READABLE for k in keys)):
        return tensors.__getitem__
    try:
        loaded = mx.load(str(tensors.path), format="safetensors")
    except Exception:  # MLX's parser refused what ours accepted: read it ours
        return tensors.__getitem__
    return lambda key: loaded[key] if key in loaded else tensors[key]


def _builders(part: str) -> tuple[Callable[[Path, Mapping[str, tuple]], Any], Callable[[Any], nn.Module]]:
    """(config_from_shapes(path, shapes), model_class) per part; VAE/CLIP imported only when needed."""
    if part == "unet":
        from sd.models.unet import UNetModel

        return detect_unet_config, UNetModel
    if part == "vae":
        from sd.models.vae import AutoencoderKL, vae_config_from_weights

        return lambda path, shapes: vae_config_from_weights(shapes, path), AutoencoderKL
    from sd.models.clip import CLIPTextModel, clip_config_from_weights

    return lambda path, shapes: clip_config_from_weights(shapes, path), CLIPTextModel


def _construct(path: Path, part: str, keys: Mapping[str, str], tensors) -> tuple[Any, nn.Module, dict]:
    """(config, module with unevaluated random weights, file shapes): the architecture read off the shapes."""
    file_shapes = {name: tuple(tensors.shape(key)) for name, key in keys.items()}
    config_from_shapes, model_class = _builders(part)
    config = config_from_shapes(path, file_shapes)
    return config, model_class(config), file_shapes


def _build(path: Path, part: str, keys: Mapping[str, str], tensors, dtype: mx.Dtype | None,
           mlx_reads: bool | None = None):
    """Build, check and fill one component. `keys` maps prefix-stripped names to the file's keys."""
    config, model, file_shapes = _construct(path, part, keys, tensors)
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    check_weights_match(path, part, expected, file_shapes)
    dtype = dtype or default_dtype(part)
    wanted = [keys[name] for name in expected]
    read = _tensor_source(tensors, wanted, on_gpu() if mlx_reads is None else mlx_reads)
    model.load_weights([(name, _to_mlx(read(keys[name]), dtype)) for name in expected], strict=True)
    try:
        mx.eval(model.parameters())
    except RuntimeError as exc:  # MLX reads lazily: a file that changed since it was checked fails here
        raise CheckpointError(path, f"cannot read the {part} weights: {exc}") from exc
    model.eval()
    return config, model


@dataclass
class Checkpoint:
    """The parts one checkpoint file holds; a part the file lacks is None."""

    path: Path
    unet: UNetModel | None = None
    vae: AutoencoderKL | None = None
    clip: CLIPTextModel | None = None
    unet_config: UNetConfig | None = None
    vae_config: VAEConfig | None = None
    clip_config: CLIPTextConfig | None = None

    def _require(self, part: str):
        model = getattr(self, part)
        if model is None:
            raise MissingComponentError(
                f"{self.path}: the checkpoint has no {LABELS[part]} weights ('{PREFIXES[part]}*' keys); "
                f"load a separate {LABELS[part]} file or use a checkpoint that includes one")
        return model

    def require_unet(self) -> UNetModel:
        return self._require("unet")

    def require_vae(self) -> AutoencoderKL:
        return self._require("vae")

    def require_clip(self) -> CLIPTextModel:
        return self._require("clip")


def _open_and_split(path: Path) -> tuple[Any, dict[str, dict[str, Any]]]:
    tensors = open_tensors(path)
    check_family(path, tensors.keys())
    parts = split_components(tensors.keys())
    if parts["unknown"]:
        raise CheckpointError(path, f"{len(parts['unknown'])} keys belong to no SD1.x component: "
                                    f"{_abbreviate(sorted(parts['unknown']))}. Is this an SD1.x checkpoint?")
    if not any(parts[p] for p in COMPONENTS):
        raise CheckpointError(path, "no SD1.x weights found (expected keys starting with "
                                    + ", ".join(f"'{p}'" for p in PREFIXES.values()) + ")")
    return tensors, parts


def load_checkpoint(path: str | Path, dtype: str | mx.Dtype | None = None,
                    parts: Iterable[str] = COMPONENTS) -> Checkpoint:
    """Load every part the file has (of `parts`). `dtype` None: per-part defaults (sd/accel/precision.py)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    tensors, split = _open_and_split(path)
    checkpoint = Checkpoint(path)
    for part in parts:
        if split[part]:
            config, model = _build(path, part, split[part], tensors, dtype)
            setattr(checkpoint, part, model)
            setattr(checkpoint, f"{part}_config", config)
    return checkpoint


def load_component(path: str | Path, part: str,
                   dtype: str | mx.Dtype | None = None) -> UNetModel | AutoencoderKL | CLIPTextModel:
    """Load only one part ("unet", "vae" or "clip") of a checkpoint; MissingComponentError if absent."""
    if part not in COMPONENTS:
        raise ValueError(f"unknown part {part!r}; use one of {COMPONENTS}")
    return load_checkpoint(path, dtype, parts=(part,))._require(part)


def build_skeleton(path: str | Path, part: str) -> UNetModel | AutoencoderKL | CLIPTextModel:
    """The part's module built from the file's shapes with *unevaluated* random weights: MLX is lazy, so
    this reads only the header and allocates nothing. Enough to match LoRA keys against (never run it).
    MissingComponentError if the file has no such part."""
    if part not in COMPONENTS:
        raise ValueError(f"unknown part {part!r}; use one of {COMPONENTS}")
    path = Path(path)
    tensors = open_tensors(path)
    keys = split_components(tensors.keys())[part]
    if not keys:
        raise MissingComponentError(f"{path}: the checkpoint has no {LABELS[part]} weights "
                                    f"('{PREFIXES[part]}*' keys)")
    return _construct(path, part, keys, tensors)[1]
