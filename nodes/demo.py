"""`sdgraph demo`: random-weight stand-ins for the files the shipped workflows name, so they run on a
fresh machine (the images are noise until real weights are put in place).

Writes models/checkpoints/v1-5-pruned-emaonly.safetensors (a tiny random SD1.5-layout checkpoint) —
only when no file of that name exists: a user's real model is never overwritten — plus
models/loras/detail.safetensors and style.safetensors (kohya LoRAs fitting that checkpoint),
models/vae/vae-ft-mse-840000-ema-pruned.safetensors (a random VAE in the LDM layout of the real file, for
workflows/external_vae.yaml), models/embeddings/easynegative.safetensors (a random 8-vector textual-inversion
embedding as wide as that checkpoint's text encoder), models/upscale_models/4x-UltraSharp.pth (a small random
ESRGAN x4 in the old ESRGAN key layout, as the real file has it), input/example.png and its inpainting mask
input/example_mask.png (white over the image's disc), and for the merging and inpainting
examples a second checkpoint (other-model.safetensors), a 9-channel inpainting one
(sd-v1-5-inpainting.safetensors) and an A1111 hypernetwork (models/hypernetworks/demo-hypernetwork.pt, written
by sdgraph's own torch-free pickle writer, for the main checkpoint's widths),
models/controlnet/control_v11p_sd15_canny.safetensors (a random ControlNet in the LDM layout, for that
checkpoint's UNet) and a random GLIGEN model (models/gligen/gligen_sd14_textbox_pruned.safetensors, the
layout of ComfyUI's repackaged file, float16, sized for the main checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import numpy as np

CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors"
# (file name, synthetic size, seed): the second model and the inpainting model the merge examples name
EXTRA_CHECKPOINTS = (("other-model.safetensors", "tiny", 1),
                     ("sd-v1-5-inpainting.safetensors", "tiny-inpainting", 2))
HYPERNETWORK_NAME = "demo-hypernetwork.pt"
GLIGEN_NAME = "gligen_sd14_textbox_pruned.safetensors"
LORA_NAMES = ("detail.safetensors", "style.safetensors")
UPSCALE_MODEL_NAME = "4x-UltraSharp.pth"
EXAMPLE_IMAGE = "example.png"
EXAMPLE_MASK = "example_mask.png"  # white where the inpainting examples repaint (the example's disc)
VAE_NAME = "vae-ft-mse-840000-ema-pruned.safetensors"
EMBEDDING_NAME = "easynegative.safetensors"
CONTROLNET_NAME = "control_v11p_sd15_canny.safetensors"

# 2-D weights a kohya LoRA patches: UNet attention projections, CLIP attention and MLP
_UNET_LAYERS = (".attn1.to_q.weight", ".attn1.to_k.weight", ".attn1.to_v.weight", ".attn1.to_out.0.weight",
                ".attn2.to_q.weight", ".attn2.to_k.weight", ".attn2.to_v.weight", ".attn2.to_out.0.weight")
_CLIP_LAYERS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight",
                "fc2.weight")


def write_kohya_lora(path: Path, checkpoint: Path, seed: int, rank: int = 4, scale: float = 0.05) -> Path:
    """A random kohya-format LoRA (lora_unet_* / lora_te_*, LDM-style names) for `checkpoint`'s layers."""
    from safetensors.numpy import save_file

    from sd.io.checkpoint_io import open_tensors
    from sd.loading.checkpoint import PREFIXES

    tensors = open_tensors(checkpoint)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key in tensors.keys():
        if key.startswith(PREFIXES["unet"]) and key.endswith(_UNET_LAYERS):
            name = "lora_unet_" + key[len(PREFIXES["unet"]):].removesuffix(".weight").replace(".", "_")
        elif key.startswith(PREFIXES["clip"]) and key.endswith(_CLIP_LAYERS):
            name = "lora_te_" + key[len(PREFIXES["clip"]):].removesuffix(".weight").replace(".", "_")
        else:
            continue
        out_f, in_f = tensors.shape(key)
        out[f"{name}.lora_down.weight"] = (scale * rng.standard_normal((rank, in_f))).astype(np.float32)
        out[f"{name}.lora_up.weight"] = (scale * rng.standard_normal((out_f, rank))).astype(np.float32)
        out[f"{name}.alpha"] = np.array(rank, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


def write_vae(path: Path, seed: int = 3) -> Path:
    """A random tiny VAE as the real vae-ft-mse file stores it: LDM keys without a prefix, float32."""
    from safetensors.numpy import save_file

    from sd.synthetic.vae import TINY_VAE, random_vae_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(random_vae_weights(TINY_VAE, np.random.default_rng(seed)), str(tmp))
    tmp.replace(path)
    return path


def write_demo_hypernetwork(path: Path, checkpoint: Path, seed: int = 3) -> Path:
    """A random A1111 hypernetwork with modules for every attention k/v input width of `checkpoint`."""
    from sd.io.checkpoint_io import open_tensors
    from sd.synthetic.hypernetwork import random_modules, write_hypernetwork

    tensors = open_tensors(checkpoint)
    widths = sorted({tensors.shape(k)[1] for k in tensors.keys() if k.endswith(".to_k.weight")})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_hypernetwork(tmp, random_modules(widths, seed=seed, scale=0.02), name="sdgraph demo")
    tmp.replace(path)
    return path


def write_embedding(path: Path, checkpoint: Path, seed: int, vectors: int = 8) -> Path:
    """A random textual-inversion embedding (A1111/kohya safetensors layout, `emb_params`) for `checkpoint`'s
    text encoder, scaled like its token vectors."""
    from safetensors.numpy import save_file

    from sd.io.checkpoint_io import open_tensors
    from sd.loading.checkpoint import PREFIXES

    tokens = open_tensors(checkpoint)[PREFIXES["clip"] + "text_model.embeddings.token_embedding.weight"]
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vectors, tokens.shape[1])) * float(np.std(tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": emb.astype(np.float32)}, str(path))
    return path


def _write_checkpoint(path: Path, size: str, seed: int) -> Path:
    from sd.synthetic import make_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    make_checkpoint(tmp, size, fmt="safetensors", seed=seed)
    tmp.replace(path)  # whole file or none: a half-written checkpoint would look real
    return path


def write_example_image(path: Path, size: int = 512) -> Path:
    """A smooth colour gradient with a disc: something recognisable to start img2img from."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = ((x - 0.5) ** 2 + (y - 0.55) ** 2) < 0.08
    rgb = np.stack([x, y, 1.0 - x], axis=-1)
    rgb[disc] = (1.0, 0.85, 0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def write_example_mask(path: Path, size: int = 512) -> Path:
    """A black-and-white mask for the example image: white (paint here) over its disc, a little wider."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = ((x - 0.5) ** 2 + (y - 0.55) ** 2) < 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((disc * 255).astype(np.uint8)).save(path)
    return path


def write_upscale_stand_in(path: Path) -> Path:
    """A random ESRGAN x4 (16 features, 1 block; the real 4x-UltraSharp has 64 and 23) in the old ESRGAN
    layout, written whole or not at all."""
    from sd.synthetic.upscale import esrgan_state, write_upscale_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_upscale_model(tmp, esrgan_state("old", scale=4, num_feat=16, num_blocks=1, seed=7))
    tmp.replace(path)
    return path


def write_controlnet_stand_in(path: Path, checkpoint: Path) -> Path:
    """A random LDM-layout ControlNet fitting `checkpoint`'s UNet, written whole or not at all."""
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.checkpoint import PREFIXES
    from sd.models.unet import unet_config_from_weights
    from sd.synthetic.controlnet import SD15_HINT, TINY_HINT, make_controlnet

    tensors, prefix = open_tensors(checkpoint), PREFIXES["unet"]
    shapes = {k[len(prefix):]: tensors.shape(k) for k in tensors if k.startswith(prefix)}
    cfg = unet_config_from_weights(shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    make_controlnet(tmp, cfg, SD15_HINT if cfg.model_channels >= 320 else TINY_HINT, seed=8)
    tmp.replace(path)
    return path


def make_demo(models_dir: str | Path, input_dir: str | Path, image_size: int = 512,
              out: TextIO | None = None) -> list[Path]:
    """Write the stand-in files that are missing; returns the paths written (existing files are kept)."""
    from sd.errors import SDGraphError

    out = out or sys.stdout  # looked up now: a default bound at import would keep a replaced stream
    models_dir, input_dir = Path(models_dir), Path(input_dir)
    checkpoint = models_dir / "checkpoints" / CHECKPOINT_NAME
    written: list[Path] = []
    if checkpoint.exists():
        print(f"kept {checkpoint} (exists; never overwritten)", file=out)
    else:
        written.append(_write_checkpoint(checkpoint, "tiny", 0))
    for name, size, seed in EXTRA_CHECKPOINTS:
        if not (models_dir / "checkpoints" / name).exists():
            written.append(_write_checkpoint(models_dir / "checkpoints" / name, size, seed))
    for seed, name in enumerate(LORA_NAMES, start=1):
        lora = models_dir / "loras" / name
        if not lora.exists():
            try:
                written.append(write_kohya_lora(lora, checkpoint, seed))
            except SDGraphError as e:  # the LoRA's shapes come from the user's checkpoint
                print(f"skipped {lora}: {e}", file=out)
    vae = models_dir / "vae" / VAE_NAME
    if not vae.exists():
        written.append(write_vae(vae))
    embedding = models_dir / "embeddings" / EMBEDDING_NAME
    if not embedding.exists():
        try:
            written.append(write_embedding(embedding, checkpoint, seed=3))
        except (SDGraphError, KeyError) as e:  # its width comes from the user's checkpoint
            print(f"skipped {embedding}: {e}", file=out)
    upscaler = models_dir / "upscale_models" / UPSCALE_MODEL_NAME
    if not upscaler.exists():
        written.append(write_upscale_stand_in(upscaler))
    hypernetwork = models_dir / "hypernetworks" / HYPERNETWORK_NAME
    if not hypernetwork.exists():
        try:
            written.append(write_demo_hypernetwork(hypernetwork, checkpoint))
        except SDGraphError as e:
            print(f"skipped {hypernetwork}: {e}", file=out)
    controlnet = models_dir / "controlnet" / CONTROLNET_NAME
    if not controlnet.exists():
        try:
            written.append(write_controlnet_stand_in(controlnet, checkpoint))
        except (SDGraphError, KeyError, ValueError) as e:  # its sizes come from the user's checkpoint
            print(f"skipped {controlnet}: {e}", file=out)
    gligen = models_dir / "gligen" / GLIGEN_NAME
    if not gligen.exists():
        from sd.synthetic.gligen import gligen_for_checkpoint

        try:
            written.append(gligen_for_checkpoint(gligen, checkpoint, seed=5, dtype=np.float16))
        except (SDGraphError, StopIteration) as e:  # its sizes come from the user's checkpoint
            print(f"skipped {gligen}: {e}", file=out)
    image = input_dir / EXAMPLE_IMAGE
    if not image.exists():
        written.append(write_example_image(image, image_size))
    mask = input_dir / EXAMPLE_MASK
    if not mask.exists():
        written.append(write_example_mask(mask, image_size))
    for path in written:
        print(f"wrote {path}", file=out)
    if any(p.suffix in (".safetensors", ".pth", ".pt") for p in written):
        print("These models are RANDOM-WEIGHT stand-ins: the workflows run, but the images will be noise "
              f"(or noisy). Put a real SD1.5 checkpoint at {checkpoint}, real LoRAs in "
              f"{models_dir / 'loras'}, embeddings in {models_dir / 'embeddings'}, a real VAE in "
              f"{models_dir / 'vae'}, a real upscale model at {upscaler} and a real ControlNet at "
              f"{controlnet} under those names to get real "
              "images.", file=out)
    return written


def copy_example_workflows(dest: str | Path, out: TextIO | None = None) -> list[Path]:
    """Copy the example workflows shipped with sdgraph into `dest` (./workflows), so that an installed
    sdgraph runs `sdgraph run workflows/txt2img.yaml` as the README says. Existing files are kept; in a
    checkout, where `dest` is the examples folder itself, nothing happens."""
    import shutil

    import workflows

    out = out or sys.stdout
    source, dest = Path(workflows.__file__).resolve().parent, Path(dest)
    if dest.resolve() == source:
        return []
    written = []
    for path in sorted(source.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json", ".txt") or not path.is_file():
            continue
        target = dest / path.name
        if target.exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        written.append(target)
    if written:
        print(f"copied {len(written)} example workflows to {dest}/ (from {source})", file=out)
    return written
