"""What CheckpointLoader's `config_name` (an LDM inference YAML) may say, checked against what sdgraph runs.

sdgraph reads the architecture off the weights, so a config adds only what weights cannot tell: the text
encoder's output layer (`cond_stage_config.params.layer: hidden` + `layer_idx`, ComfyUI's clip skip) and
the prediction type. A YAML in models/configs is parsed with yaml.safe_load (nothing in it runs); the
configs ComfyUI ships in its own models/configs are known by name (SHIPPED), so workflows naming them run
without the files. Anything sdgraph cannot honour (v-prediction, SD2.x, pix2pix UNets) is refused, at
validation: `resolve_config` is CheckpointLoader's `reads_files` resolver.
"""

from __future__ import annotations

from pathlib import Path

from nodes.paths import check_name, resolve

# ComfyUI's models/configs: name -> CLIP layer (-1 last), or None for configs sdgraph cannot run
SHIPPED = {
    "v1-inference.yaml": -1, "v1-inference_fp16.yaml": -1,
    "v1-inference_clip_skip_2.yaml": -2, "v1-inference_clip_skip_2_fp16.yaml": -2, "anything_v3.yaml": -2,
    "v1-inpainting-inference.yaml": -1, "v2-inference.yaml": None, "v2-inference_fp32.yaml": None,
    "v2-inference-v.yaml": None, "v2-inference-v_fp32.yaml": None, "v2-inpainting-inference.yaml": None,
}
_SUPPORTED = ", ".join(n for n, layer in SHIPPED.items() if layer is not None)


def _configs_dir(folders) -> Path:
    return Path(folders.models_dir) / "configs"


def _user_config(config_name: str, folders) -> Path | None:
    try:
        return resolve(config_name, _configs_dir(folders), "config", (".yaml", ".yml"), "--models-dir")
    except FileNotFoundError:
        return None


def _shipped_layer(config_name: str, folders) -> int:
    name = Path(config_name.replace("\\", "/")).name
    if name not in SHIPPED:
        raise ValueError(f"config_name {config_name!r} is neither a file in {_configs_dir(folders)} nor one "
                         f"of ComfyUI's shipped configs sdgraph knows ({_SUPPORTED})")
    if SHIPPED[name] is None:
        raise ValueError(f"config_name {config_name!r} is for an SD2.x or v-prediction model; "
                         f"sdgraph runs SD1.x eps-prediction checkpoints ({_SUPPORTED})")
    return SHIPPED[name]


def resolve_config(config_name: str, folders) -> Path:
    """The file whose content decides what `config_name` means: the YAML in models/configs, or for one of
    ComfyUI's shipped names this module (its SHIPPED table is that meaning, and part of the cache key).
    ValueError for a config sdgraph cannot honour."""
    check_name(config_name, "config_name")
    path = _user_config(config_name, folders)
    if path is None:
        _shipped_layer(config_name, folders)
        return Path(__file__)
    _layer_from_yaml(path)
    return path


def config_clip_layer(config_name: str, folders) -> int:
    """The CLIP layer the config asks for (-1 = last); ValueError for a config sdgraph cannot honour."""
    check_name(config_name, "config_name")
    path = _user_config(config_name, folders)
    return _shipped_layer(config_name, folders) if path is None else _layer_from_yaml(path)


def _layer_from_yaml(path: Path) -> int:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = data["model"]["params"]
        if not isinstance(params, dict):
            raise TypeError(f"model.params is a {type(params).__name__}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError) as e:
        raise ValueError(f"config {path} is not an LDM model config (model.params): {e}") from None
    try:
        return _layer_from_params(path, params)
    except (AttributeError, TypeError) as e:  # a section that is not a mapping
        raise ValueError(f"config {path} has an unexpected structure: {e}") from None


def _layer_from_params(path: Path, params: dict) -> int:
    if params.get("parameterization", "eps") != "eps":
        raise ValueError(f"config {path} is for a {params['parameterization']}-prediction model; sdgraph "
                         "samples eps-prediction SD1.x models only")
    unet = (params.get("unet_config") or {}).get("params") or {}
    if unet.get("in_channels", 4) not in (4, 9) or unet.get("context_dim", 768) != 768:
        raise ValueError(f"config {path} describes a UNet with {unet.get('in_channels')} input channels and "
                         f"context {unet.get('context_dim')}; SD1.x has 4 (9 for inpainting) and 768")
    clip = params.get("cond_stage_config") or {}
    if "FrozenCLIPEmbedder" not in str(clip.get("target", "FrozenCLIPEmbedder")):
        raise ValueError(f"config {path} uses the text encoder {clip.get('target')}; SD1.x uses "
                         "FrozenCLIPEmbedder")
    clip_params = clip.get("params") or {}
    if clip_params.get("layer") == "hidden":
        layer = clip_params.get("layer_idx")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer >= 0:
            raise ValueError(f"config {path}: cond_stage_config layer_idx {layer!r} must be a negative "
                             "integer")
        return layer
    return -1
