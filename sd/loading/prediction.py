"""What a checkpoint says about its prediction type: v-prediction and zero-terminal-SNR markers.

SD1.x weights cannot tell an eps model from a v-prediction one, so the flag travels beside them:

- empty marker tensors ``v_pred`` (and ``ztsnr`` with it) at the top level of the state dict, as ComfyUI's
  checkpoint saver writes them and ComfyUI reads them (there for SDXL; the same keys mean the same here);
- a companion ``.yaml`` next to the checkpoint (same name; the LDM config A1111 and ComfyUI's
  CheckpointLoader read) whose ``model.params.parameterization`` is ``"v"``. It is parsed with
  ``yaml.safe_load`` (plain data only) and only a bounded size of it is read.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from sd.errors import CheckpointError

MARKER_KEYS = frozenset({"v_pred", "ztsnr"})
MAX_CONFIG_BYTES = 1 << 20  # an LDM config is ~2 KB


@dataclass(frozen=True)
class DetectedSampling:
    prediction: str  # "eps" or "v_prediction"
    zsnr: bool
    evidence: str  # for the load log ("" when nothing marks the file)


def companion_config(path: str | Path) -> Path | None:
    """The ``.yaml`` beside the checkpoint (``model.safetensors`` -> ``model.yaml``), if there is one."""
    path = Path(path)
    for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if candidate != path and candidate.is_file():
            return candidate
    return None


def _config_parameterization(config: Path) -> str | None:
    try:
        with open(config, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise CheckpointError(config, f"cannot read the checkpoint's config: {e.strerror or e}") from e
    if len(text) > MAX_CONFIG_BYTES:
        raise CheckpointError(config, f"the checkpoint's config is over {MAX_CONFIG_BYTES >> 10} KB; "
                                      "not an LDM model config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CheckpointError(config, f"the checkpoint's config is not valid YAML ({str(e)[:200]}); fix or "
                                      "remove it") from e
    params = data.get("model", {}).get("params", {}) if isinstance(data, dict) else {}
    value = params.get("parameterization") if isinstance(params, dict) else None
    return value if isinstance(value, str) else None


def detect_sampling(path: str | Path, keys: Collection[str]) -> DetectedSampling:
    """The prediction type and zsnr flag the file (its keys) and its companion config declare."""
    if "v_pred" in keys:
        zsnr = "ztsnr" in keys  # as ComfyUI: ztsnr is read only beside v_pred
        return DetectedSampling("v_prediction", zsnr, "its 'v_pred'" + (" and 'ztsnr'" if zsnr else "")
                                + " keys")
    config = companion_config(path)
    if config is not None:
        parameterization = _config_parameterization(config)
        if parameterization == "v":
            return DetectedSampling("v_prediction", False, f"parameterization: \"v\" in {config.name}")
        if parameterization not in (None, "eps"):
            raise CheckpointError(config, f"parameterization {parameterization!r} is not supported "
                                          "(SD1.x: 'eps' or 'v')")
    return DetectedSampling("eps", False, "")
