"""Benchmark: apply a full-size rank-32 kohya LoRA (every SD1.5 attention and MLP linear of the UNet
transformers and the CLIP encoder: 192 + 72 layers), switch its strength, and compare with reloading the
checkpoint, which is what a destructive merge would need for every strength change.

    .venv/bin/python bench/bench_lora.py [--checkpoint PATH] [--dtype float16|float32] [--rank 32]

Without --checkpoint a random full-size SD1.5 UNet + CLIP checkpoint is written to a temporary folder
(~1.9 GB in fp16). Timings are wall-clock seconds (best of one) on MLX's default device; the reload
figure is a warm-cache reload (the file in the OS page cache), the cheapest a reload can be.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# isort: off
from sd import runtime

runtime.setup()  # must precede mlx: loads an optimised BLAS for MLX's CPU backend
# isort: on
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sd.loading.checkpoint import load_checkpoint  # noqa: E402
from sd.lora import apply_loras, load_lora  # noqa: E402
from sd.lora.keymap import unet_diffusers_names, weight_modules  # noqa: E402
from sd.synthetic import make_checkpoint  # noqa: E402

_UNET_LAYERS = (".attn1.to_", ".attn2.to_", ".ff.net.", ".proj_in", ".proj_out")
_CLIP_LAYERS = (".self_attn.", ".mlp.fc")


def write_kohya_lora(path: Path, unet, clip, rank: int, seed: int = 0) -> Path:
    """A kohya LoRA (diffusers-style names, as kohya writes them) over every attention/MLP layer."""
    rng, tensors = np.random.default_rng(seed), {}
    unet_shapes = {k: tuple(v.shape) for k, v in tree_flatten(unet.parameters())}
    ldm_to_diffusers = {ldm: d for d, ldm in unet_diffusers_names(list(weight_modules(unet_shapes))).items()}
    clip_shapes = {k: tuple(v.shape) for k, v in tree_flatten(clip.parameters())}
    layers = [("lora_unet_" + ldm_to_diffusers[name].replace(".", "_"), shape)
              for name, shape in weight_modules(unet_shapes).items() if any(p in name for p in _UNET_LAYERS)]
    layers += [("lora_te_" + name.replace(".", "_"), shape)
               for name, shape in weight_modules(clip_shapes).items() if any(p in name for p in _CLIP_LAYERS)]
    for key, (out_f, in_f, *kernel) in layers:
        down_shape, up_shape = (rank, in_f, *kernel), (out_f, rank, *[1] * len(kernel))
        tensors[f"{key}.lora_down.weight"] = (0.01 * rng.standard_normal(down_shape)).astype(np.float16)
        tensors[f"{key}.lora_up.weight"] = (0.01 * rng.standard_normal(up_shape)).astype(np.float16)
        tensors[f"{key}.alpha"] = np.array(rank / 2, dtype=np.float16)
    save_file(tensors, str(path))
    return path


def timed(label: str, fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<58} {best:8.3f} s")
    return result, best


def force(module) -> None:
    mx.eval([v for _, v in tree_flatten(module.parameters())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="SD1.5 checkpoint (default: random full-size)")
    parser.add_argument("--dtype", default=None, choices=("float16", "float32"),
                        help="model dtype (default: sdgraph's per-device default, fp32 on CPU)")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint, _ = timed("write random full-size checkpoint (setup)", lambda: make_checkpoint(
                Path(tmp) / "sd15.safetensors", "full", dtype="float16", parts=("unet", "clip")))

        def reload():
            model = load_checkpoint(checkpoint, dtype=args.dtype, parts=("unet", "clip"))
            force(model.unet)
            force(model.clip)
            return model

        model, reload_s = timed("load checkpoint (UNet + CLIP)", reload)
        lora_path = write_kohya_lora(Path(tmp) / "lora.safetensors", model.unet, model.clip, args.rank)
        lora, _ = timed(f"read + parse LoRA ({lora_path.stat().st_size / 2**20:.0f} MiB)",
                        lambda: load_lora(lora_path))
        print(f"coverage: {lora.coverage(model.unet, model.clip)}")

        def apply(strength: float):
            unet = apply_loras(model.unet, [(lora, strength)], "unet")
            clip = apply_loras(model.clip, [(lora, strength)], "clip")
            force(unet)
            force(clip)
            return unet, clip

        _, first_s = timed("first apply at 1.0 (deltas computed + patched)", lambda: apply(1.0))
        _, switch_s = timed("switch strength to 0.6 (deltas recomputed)", lambda: apply(0.6))
        _, again_s = timed("switch strength to 0.3", lambda: apply(0.3))
        _, hit_s = timed("same patch set again (sd.lora caches nothing: recomputed)", lambda: apply(0.3))
        _, off_s = timed("remove the LoRA (strength 0: the base itself)", lambda: apply(0.0))
        print(f"\nstrength switch {min(switch_s, again_s):.3f} s vs reload {reload_s:.3f} s "
              f"({reload_s / max(min(switch_s, again_s), 1e-9):.1f}x faster); first apply {first_s:.3f} s")


if __name__ == "__main__":
    main()
