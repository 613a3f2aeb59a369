"""Which model family a checkpoint holds, read from key names and tensor shapes; refuse all but SD1.x.

Every refusal names what was detected and the evidence, so users know why their file does not load.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from sd.errors import ArchitectureError, CheckpointError
from sd.models.unet import UNetConfig, unet_config_from_weights

UNET_PREFIX = "model.diffusion_model."
ONLY_SD1 = "only Stable Diffusion 1.x checkpoints are supported"

# Top-level key prefixes that identify other families outright.
_FAMILY_PREFIXES = (
    ("conditioner.embedders.", "SDXL (found 'conditioner.embedders.*' text encoders)"),
    ("cond_stage_model.model.", "SD2.x (found an OpenCLIP text encoder 'cond_stage_model.model.*')"),
    (UNET_PREFIX + "joint_blocks.", "SD3 (found MMDiT 'joint_blocks')"),
    (UNET_PREFIX + "double_blocks.", "Flux (found 'double_blocks')"),
)

# SD1.x's UNet reads the latent (4 channels); inpainting models (9: latent + mask + masked-image latent, fed
# through UNetExtras.concat) load too. instruct-pix2pix (8: latent + the input image's latent, with its own
# three-way CFG) needs a pipeline sdgraph does not have.
SUPPORTED_IN_CHANNELS = (4, 9)
_IN_CHANNEL_VARIANTS = {8: "an instruct-pix2pix style model (8 input channels)"}


def _refuse(path: object, detected: str) -> ArchitectureError:
    return ArchitectureError(path, f"detected {detected}; {ONLY_SD1}")


def check_family(path: object, keys: Collection[str]) -> None:
    """Refuse files whose top-level key names belong to another family (SDXL, SD2.x, SD3, Flux)."""
    for prefix, detected in _FAMILY_PREFIXES:
        if any(key.startswith(prefix) for key in keys):
            raise _refuse(path, detected)


def check_unet_family(path: object, shapes: Mapping[str, tuple]) -> None:
    """Refuse non-SD1.x UNets from their prefix-stripped key -> shape mapping (PyTorch layout)."""
    if "label_emb.0.0.weight" in shapes:
        raise _refuse(path, "a UNet with 'label_emb' size/class conditioning (SDXL, SD2 unCLIP or upscaler)")
    if "input_blocks.0.0.weight" not in shapes:
        sample = ", ".join(sorted(shapes)[:3])
        raise _refuse(path, f"an unknown UNet layout (no 'input_blocks.0.0.weight'; keys like {sample})")
    in_channels = shapes["input_blocks.0.0.weight"][1]
    if in_channels not in SUPPORTED_IN_CHANNELS:
        detected = _IN_CHANNEL_VARIANTS.get(in_channels, f"a UNet with {in_channels} input channels")
        raise _refuse(path, detected)
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and shape[1] in (1024, 2048):
            family = "SD2.x" if shape[1] == 1024 else "SDXL"
            raise _refuse(path, f"{family} (cross-attention context width {shape[1]} in '{key}'; "
                                "SD1.x uses 768)")
        if key.endswith("proj_in.weight") and len(shape) == 2:
            raise _refuse(path, f"SD2.x (linear proj_in '{key}' of shape {shape}; SD1.x uses 1x1 convs)")


def detect_unet_config(path: object, shapes: Mapping[str, tuple]) -> UNetConfig:
    """Check the UNet is SD1.x and read its config; a layout we cannot read names the missing key."""
    check_unet_family(path, shapes)
    try:
        return unet_config_from_weights(shapes)
    except KeyError as err:
        key = err.args[0]
        raise CheckpointError(path, f"UNet key '{UNET_PREFIX}{key}' is missing, so the architecture cannot "
                                    "be read; is the file complete and an SD1.x checkpoint?") from None
    except ValueError as err:
        raise CheckpointError(path, f"irregular UNet layout ({err}); {ONLY_SD1}") from None
