"""Standalone VAE files (what ComfyUI's VAELoader reads from models/vae/), in the layouts found in the wild.

- LDM keys without a prefix (`encoder.conv_in.weight`, `decoder.up.0.block.1.conv1.weight`): the
  vae-ft-mse-840000 / kl-f8 releases, most civitai VAEs.
- The same with `first_stage_model.` (a VAE cut out of a checkpoint, or a whole checkpoint: its other
  parts are then left unread).
- diffusers `AutoencoderKL` (`encoder.down_blocks.0.resnets.0.conv1.weight`, `decoder.up_blocks.*`,
  `*.mid_block.attentions.0.to_q.weight` or the older `query`/`key`/`value`/`proj_attn`).

The mid-block attention's q/k/v/out are 1x1 convs in LDM files and linear layers in diffusers and in some
re-exported LDM files: a 2-D weight is read as the 1x1 conv it equals. Training leftovers (`model_ema.*`,
`loss.*` in the vae-ft-mse `.ckpt`) are ignored; any other key is an error naming it. The architecture
is read off the shapes (sd/models/vae.py), and only SD-style VAEs with 4 latent channels load: others
(SD3/Flux 16-channel, TAESD, the video decoder) are refused with what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from sd.errors import ArchitectureError, CheckpointError
from sd.io.checkpoint_io import open_tensors

LDM_PREFIX = "first_stage_model."
LAYOUTS = ("ldm", "ldm-prefixed", "diffusers")
LATENT_CHANNELS = 4

_IGNORED = ("model_ema.", "loss.", LDM_PREFIX + "loss.")
_OTHER_PARTS = ("model.diffusion_model.", "cond_stage_model.", "model_ema.")  # a whole checkpoint's
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_ATTN_LINEAR = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_REFUSED = (
    ("taesd_decoder.", "a TAESD tiny autoencoder"),
    ("decoder.layers.", "a TAESD tiny autoencoder"),
    ("decoder.mid.block_1.mix_factor", "a video (temporal) decoder"),
    ("vquantizer.", "a VQ-GAN (Stable Cascade stage A)"),
)

# diffusers AutoencoderKL -> LDM names: module renames inside blocks
_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
                   "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_DIFFUSERS_RENAMES = (
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."),
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\."),
     lambda m, n: f"encoder.down.{m[1]}.downsample."),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."),
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\."),
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\."),
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\."), lambda m, n: f"{m[1]}.mid.attn_1."),
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\."), lambda m, n: f"{m[1]}.norm_out."),
)


def _from_diffusers(key: str, up_blocks: int) -> str:
    for pattern, replace in _DIFFUSERS_RENAMES:
        m = pattern.match(key)
        if m:
            rest = key[m.end():]
            if ".mid.attn_1." in (new := replace(m, up_blocks)):
                module, _, leaf = rest.rpartition(".")
                rest = f"{_DIFFUSERS_ATTN.get(module, module)}.{leaf}"
            else:
                rest = rest.replace("conv_shortcut.", "nin_shortcut.")
            return new + rest
    return key


def vae_keys(path: object, keys: list[str]) -> tuple[str, dict[str, str]]:
    """(layout, {LDM name without prefix: the file's key}) for a standalone VAE file's keys; CheckpointError
    (ArchitectureError for another kind of autoencoder) naming what does not fit."""
    for marker, what in _REFUSED:
        if any(k.startswith(marker) for k in keys):
            raise ArchitectureError(path, f"this is {what} ('{marker}*' keys), not an SD VAE "
                                          "(AutoencoderKL); sdgraph loads SD1.x-style VAEs only")
    keys = [k for k in keys if not k.startswith(_IGNORED)]
    if any(k.startswith(LDM_PREFIX) for k in keys):
        layout = "ldm-prefixed"
        names = {k[len(LDM_PREFIX):]: k for k in keys if k.startswith(LDM_PREFIX)}
        unknown = [k for k in keys if not k.startswith((LDM_PREFIX, *_OTHER_PARTS))]
    else:
        names = {k: k for k in keys}
        layout = "diffusers" if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k
                                    for k in names) else "ldm"
        unknown = []
    if layout == "diffusers":
        ups = {int(m[1]) for k in names if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
        names = {_from_diffusers(k, len(ups)): v for k, v in names.items()}
    unknown += [v for k, v in names.items() if not k.startswith(_VAE_ROOTS)]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        shown = ", ".join(sorted(unknown)[:5])
        raise CheckpointError(path, f"{len(unknown)} key(s) belong to no VAE: {shown}{more}. A standalone "
                                    "VAE holds 'encoder.*'/'decoder.*' keys (LDM or diffusers layout)")
    if "encoder.conv_in.weight" not in names or "decoder.conv_in.weight" not in names:
        raise CheckpointError(path, "no VAE weights found (expected 'encoder.conv_in.weight' and "
                                    "'decoder.conv_in.weight', with or without 'first_stage_model.', or "
                                    "diffusers AutoencoderKL keys)")
    return layout, names


class _RenamedTensors:
    """The file's tensors under LDM names, 2-D attention weights as the 1x1 convs they equal."""

    def __init__(self, tensors, names: Mapping[str, str]):
        self.tensors, self.names = tensors, names

    def shape(self, name: str) -> tuple:
        shape = tuple(self.tensors.shape(self.names[name]))
        return shape + (1, 1) if _ATTN_LINEAR.search(name) and len(shape) == 2 else shape

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.tensors[self.names[name]]
        return array.reshape(*array.shape, 1, 1) if _ATTN_LINEAR.search(name) and array.ndim == 2 else array


def _check_latent_channels(path: object, view: _RenamedTensors) -> None:
    latent = view.shape("post_quant_conv.weight")[1] if "post_quant_conv.weight" in view.names else None
    if latent is not None and latent != LATENT_CHANNELS:
        raise ArchitectureError(path, f"a VAE with {latent} latent channels (SD3 and Flux VAEs have 16); "
                                      f"SD1.x uses {LATENT_CHANNELS}")


def vae_layout(path: str | Path) -> str:
    """The file's layout ("ldm", "ldm-prefixed" or "diffusers"), from its header only; raises as
    load_vae_file would for a file that is no SD VAE."""
    tensors = open_tensors(path)
    layout, names = vae_keys(path, list(tensors.keys()))
    _check_latent_channels(path, _RenamedTensors(tensors, names))
    return layout


def load_vae_file(path: str | Path, dtype: str | mx.Dtype | None = None):
    """The AutoencoderKL a standalone VAE file holds (any layout above), checked key for key and shape for
    shape like a checkpoint's VAE; `dtype` None: the VAE's default (sd/accel/precision.py)."""
    from sd.accel.precision import parse_dtype
    from sd.loading.checkpoint import _build

    path = Path(path)
    tensors = open_tensors(path)
    _, names = vae_keys(path, list(tensors.keys()))
    view = _RenamedTensors(tensors, names)
    _check_latent_channels(path, view)
    _, model = _build(path, "vae", {name: name for name in names}, view, parse_dtype(dtype))
    return model
