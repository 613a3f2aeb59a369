"""Upscale model files (ESRGAN RRDBNet in its three key layouts, Real-ESRGAN SRVGGNetCompact) to MLX modules.

    model = load_upscale_model("models/upscale_models/4x-UltraSharp.pth")   # .pth/.pt/.safetensors
    model.scale, model(x)                                                    # x NHWC in [0, 1]

The architecture and its sizes are read off key names and shapes, as spandrel (the library ComfyUI loads these
files with) reads them: the feature width and block count from the convs, the scale from the number of
upsampling convs (or the last conv's pixel-shuffle width), pixel-unshuffle (Real-ESRGAN x2plus / x1) from the
first conv taking 4 or 16 times the output's channels. The file's keys are renamed onto one layout per
architecture:

    old ESRGAN    model.0 / model.1.sub.N.RDBk.convj.0 / model.1.sub.<last> / model.3, .6, ... / then hr, last
    BSRGAN        conv_first / RRDB_trunk.N.RDBk.convj / trunk_conv / upconvN / HRconv / conv_last
    Real-ESRGAN   conv_first / body.N.rdbk.convj / conv_body / conv_upN / conv_hr / conv_last   (ours)
    Compact       body.0 (conv), body.1 (PReLU), ..., body.<last> (conv)                           (ours)

Files are read through sd/io (nothing in a `.pth` pickle is executed); BasicSR's `params_ema` / `params`
wrappers and a `module.` prefix are unwrapped there and here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from sd.errors import ArchitectureError, CheckpointError
from sd.models.esrgan import RRDBConfig, RRDBNet
from sd.models.srvgg import CompactConfig, SRVGGNetCompact

SUPPORTED = "sdgraph reads ESRGAN (RRDBNet: old ESRGAN, BSRGAN and Real-ESRGAN layouts) and Real-ESRGAN " \
            "Compact (SRVGGNetCompact) upscale models"
_PREFIXES = ("module.", "netG.")  # training wrappers spandrel also strips

_OLD_DENSE = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)$")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)$")
_BSR_DENSE = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$")
_BSR_RENAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}
_UPCONV = re.compile(r"(?:upconv|conv_up)(\d)\.(weight|bias)$")


def _strip_prefix(keys: list[str]) -> dict[str, str]:
    """{name without a common training prefix: file key}."""
    for prefix in _PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys}
    return {k: k for k in keys}


def detect_architecture(path: object, names: Mapping[str, str]) -> str:
    """"esrgan-old", "bsrgan", "esrgan-new" or "compact" from the key names; ArchitectureError otherwise."""
    has = names.__contains__
    if has("model.0.weight") and has("model.1.sub.0.RDB1.conv1x1.weight"):
        raise ArchitectureError(path, f"detected ESRGAN+ (extra 1x1 convs in the dense blocks); {SUPPORTED}")
    if has("model.0.weight") and has("model.1.sub.0.RDB1.conv1.0.weight"):
        return "esrgan-old"
    if has("conv_first.weight") and has("RRDB_trunk.0.RDB1.conv1.weight"):
        return "bsrgan"
    if has("conv_first.weight") and has("body.0.rdb1.conv1.weight"):
        return "esrgan-new"
    if has("body.0.weight") and has("body.1.weight") and not has("conv_first.weight"):
        return "compact"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "lora_")) for k in names):
        raise ArchitectureError(path, f"this is a Stable Diffusion checkpoint or LoRA, not an upscale model; "
                                      f"put it in models/checkpoints or models/loras. {SUPPORTED}")
    sample = ", ".join(sorted(names)[:4]) or "no tensors"
    raise ArchitectureError(path, f"not a supported upscale model (its keys start {sample}); {SUPPORTED}; "
                                  "SwinIR, HAT, DAT and other transformer upscalers are not supported yet")


def _old_esrgan_names(path: object, names: Mapping[str, str]) -> dict[str, str]:
    """Old ESRGAN keys -> ours. model.1.sub's last index is the trunk conv; after model.1 come the
    upsampling convs at 3, 6, ... (nearest upsample, conv, LeakyReLU each), then the hr conv and the last."""
    out: dict[str, str] = {}
    trunk = {int(m.group(1)) for k in names if (m := _OLD_TRUNK.match(k))}
    top = sorted({int(m.group(1)) for k in names if (m := _OLD_TOP.match(k))} - {0, 1})
    ups = top[:-2]
    if (len(trunk) != 1 or len(top) < 2 or ups != [3 * (i + 1) for i in range(len(ups))]
            or top[-2:] != [3 * len(ups) + 2, 3 * len(ups) + 4]):
        raise ArchitectureError(path, f"an ESRGAN file in the old layout whose layers sdgraph cannot place "
                                      f"(trunk convs {sorted(trunk)}, top-level layers {top}); {SUPPORTED}")
    (nb,) = trunk
    for name, key in names.items():
        if m := _OLD_DENSE.match(name):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = key
        elif (m := _OLD_TRUNK.match(name)) and int(m.group(1)) == nb:
            out[f"conv_body.{m.group(2)}"] = key
        elif m := _OLD_TOP.match(name):
            index, kind = int(m.group(1)), m.group(2)
            target = {0: "conv_first", top[-2]: "conv_hr", top[-1]: "conv_last"}.get(index)
            if target is None and index in ups:
                target = f"conv_up{ups.index(index) + 1}"
            out[f"{target or name[:-len(kind) - 1]}.{kind}"] = key
        else:
            out[name] = key  # left for the strict check below to report
    return out


def _bsrgan_names(names: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, key in names.items():
        if m := _BSR_DENSE.match(name):
            block, rdb, conv, kind = m.groups()
            name = f"body.{block}.rdb{rdb}.conv{conv}.{kind}"
        elif m := _UPCONV.match(name):
            name = f"conv_up{m.group(1)}.{m.group(2)}"
        else:
            stem, _, kind = name.rpartition(".")
            name = f"{_BSR_RENAMES.get(stem, stem)}.{kind}"
        out[name] = key
    return out


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.fullmatch(k))})


def esrgan_config(path: object, shapes: Mapping[str, tuple]) -> RRDBConfig:
    """RRDBNet's sizes from our layout's shapes (PyTorch OIHW)."""
    try:
        feat, cin = shapes["conv_first.weight"][:2]
        grow = shapes["body.0.rdb1.conv1.weight"][0]
        cout = shapes["conv_last.weight"][0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(path, f"an ESRGAN file without the layer {e}; damaged or edited") from None
    # Real-ESRGAN x2plus / x1 fold 2x2 or 4x4 pixels into channels first (spandrel's rule)
    unshuffle = int(math.isqrt(cin // cout)) if cin in (cout * 4, cout * 16) else 1
    return RRDBConfig(in_channels=cin, out_channels=cout, num_feat=feat, num_grow=grow,
                      num_blocks=_count(shapes, r"body\.(\d+)\.rdb1\.conv1\.weight"),
                      num_upsamples=_count(shapes, r"conv_up(\d+)\.weight"), unshuffle=unshuffle)


def compact_config(path: object, shapes: Mapping[str, tuple]) -> CompactConfig:
    """SRVGGNetCompact's sizes: body.0 in/out channels, the last conv's outputs = out_channels * scale^2."""
    last = max(int(m.group(1)) for k in shapes if (m := re.fullmatch(r"body\.(\d+)\.weight", k)))
    feat, cin = shapes["body.0.weight"][:2]
    if last % 2 or last < 2 or f"body.{last}.bias" not in shapes:
        raise CheckpointError(path, f"a Compact upscaler whose last layer body.{last} is not a conv; it is "
                                    "damaged, edited, or uses an activation without weights (not supported)")
    width = shapes[f"body.{last}.bias"][0]
    for channels in (cin, 3, 4, 1):  # spandrel's guess: the output usually has the input's channels
        if width % channels == 0 and math.isqrt(width // channels) ** 2 == width // channels:
            return CompactConfig(in_channels=cin, out_channels=channels, num_feat=feat,
                                 num_conv=(last - 2) // 2, upscale=math.isqrt(width // channels))
    raise CheckpointError(path, f"a Compact upscaler whose last conv has {width} outputs, which is no "
                                "channel count times a square scale")


def _check_fit(path: Path, model, shapes: Mapping[str, tuple]) -> None:
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}

    def torch_shape(s):  # MLX OHWI -> PyTorch OIHW
        return (s[0], s[3], s[1], s[2]) if len(s) == 4 else s

    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshaped = [f"{k} (file {shapes[k]}, expected {torch_shape(s)})" for k, s in expected.items()
                 if k in shapes and tuple(shapes[k]) != torch_shape(s)]
    problems = [f"{len(v)} {what}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                for what, v in (("missing", missing), ("unexpected", unexpected),
                                ("with the wrong shape", misshaped)) if v]
    if problems:
        raise CheckpointError(path, "upscale model weights do not fit the architecture read from the file: "
                                    + "; ".join(problems) + ". The file is damaged, edited, or a variant "
                                    "sdgraph does not support.")


def describe(config: RRDBConfig | CompactConfig) -> str:
    """One line for logs: "ESRGAN x4 (64 features, 23 blocks)"."""
    if isinstance(config, CompactConfig):
        return f"Real-ESRGAN Compact x{config.scale} ({config.num_feat} features, {config.num_conv} convs)"
    unshuffle = f", pixel-unshuffle {config.unshuffle}" if config.unshuffle > 1 else ""
    return f"ESRGAN x{config.scale} ({config.num_feat} features, {config.num_blocks} blocks{unshuffle})"


def default_dtype() -> mx.Dtype:
    """fp32 on the CPU (MLX has no fast fp16 there), fp16 on a GPU, as Real-ESRGAN runs its models."""
    from sd.accel.precision import on_gpu

    return mx.float16 if on_gpu() else mx.float32


def _skeleton(path: Path):
    """(tensors, {our name: file key}, module with unevaluated weights): everything but reading the data."""
    from sd.io.checkpoint_io import open_tensors

    tensors = open_tensors(path)
    names = _strip_prefix(list(tensors.keys()))
    arch = detect_architecture(path, names)
    if arch == "esrgan-old":
        names = _old_esrgan_names(path, names)
    elif arch == "bsrgan":
        names = _bsrgan_names(names)
    elif arch == "esrgan-new":
        names = {(f"conv_up{m.group(1)}.{m.group(2)}" if (m := _UPCONV.match(n)) else n): k
                 for n, k in names.items()}
    shapes = {name: tuple(tensors.shape(key)) for name, key in names.items()}
    if arch == "compact":
        model = SRVGGNetCompact(compact_config(path, shapes))
    else:
        model = RRDBNet(esrgan_config(path, shapes))
    _check_fit(path, model, shapes)
    return tensors, names, model


def inspect_upscale_model(path: str | Path) -> RRDBConfig | CompactConfig:
    """The architecture's config, read from the file's header only; CheckpointError for a file that is not a
    supported upscale model or whose shapes do not fit one."""
    return _skeleton(Path(path))[2].config


def load_upscale_model(path: str | Path, dtype: mx.Dtype | None = None) -> RRDBNet | SRVGGNetCompact:
    """The upscale model in `path` with its weights (dtype: `default_dtype()` unless given)."""
    path = Path(path)
    tensors, names, model = _skeleton(path)
    dtype = dtype or default_dtype()
    weights = []
    for name, _ in tree_flatten(model.parameters()):
        array = np.asarray(tensors[names[name]], dtype=np.float32)
        if array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))  # OIHW -> OHWI
        weights.append((name, mx.array(array).astype(dtype)))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model
