"""The upscale section: a 4x ESRGAN upscale (ImageUpscaleWithModel's path: 512-pixel tiles, clamp) on MLX
against spandrel (ComfyUI's loader) on torch, same random weights, same image, one process.

    python -m bench --sections upscale --device gpu                 # RRDBNet 64 features, 23 blocks, 512x512
    python -m bench --sections upscale --size tiny --device cpu     # 16 features, 1 block, 128x128

"full" is the size of the community 4x models (4x-UltraSharp, RealESRGAN_x4plus: 64 features, 23 blocks;
~9 TFLOP for 512x512 -> 2048x2048, minutes on a small CPU). Both sides run the GPU precision (fp16) or fp32
on the CPU. The maximum difference between the two outputs is printed as a check.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from bench.common import OUT_DIR


def _model_file(size: str):
    from sd.synthetic.upscale import esrgan_state, write_upscale_model

    feat, blocks = (64, 23) if size == "full" else (16, 1)
    path = OUT_DIR / f"esrgan-4x-{size}.pth"
    state = esrgan_state("old", scale=4, num_feat=feat, num_blocks=blocks, seed=0)
    if not path.exists():
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        write_upscale_model(path, state)
    return path, state, feat, blocks


def section_upscale(ctx) -> None:
    from bench.sections import mlx_working_memory, torch_working_memory
    from sd.accel.compiled import FastUpscaler
    from sd.image.upscale import upscale_image
    from sd.loading.upscale_models import load_upscale_model

    size = ctx.args.image
    path, state, feat, blocks = _model_file(ctx.args.size)
    dtype = mx.float16 if ctx.gpu else mx.float32
    model = load_upscale_model(path, dtype=dtype)
    image = np.random.default_rng(3).random((1, 3, size, size), dtype=np.float32)
    x = mx.array(image.transpose(0, 2, 3, 1))
    fast = FastUpscaler(model)  # what ImageUpscaleWithModel runs (this device's levers)
    times = {"mlx": ctx.time_mlx(lambda: upscale_image(model, x), heavy=True),
             "mlx_fast": ctx.time_mlx(lambda: upscale_image(fast, x), heavy=True)}
    ours = np.array(upscale_image(fast, x)).transpose(0, 3, 1, 2)
    memory = {"mlx_fast": mlx_working_memory(lambda: upscale_image(fast, x))}
    note = ""
    if not ctx.args.mlx_only:
        from tests.spandrel_reference import load

        torch = ctx.torch
        ref = load(state).to(ctx.tdev).to(ctx.tdtype)
        tx = torch.from_numpy(image).to(ctx.tdev, ctx.tdtype)
        # a 512x512 image is one of ComfyUI's tiles: tiled_scale calls the model on it whole
        times["spandrel"] = ctx.time_torch(lambda: ref(tx), heavy=True)
        if ctx.gpu:
            memory["spandrel"] = torch_working_memory(ctx, lambda: ref(tx))
        with torch.inference_mode():
            theirs = ref(tx).float().cpu().numpy()
        diff = float(np.abs(ours - theirs).max())
        ratio = min(times["mlx"], times["mlx_fast"]) / times["spandrel"]
        note = f"best MLX / spandrel = {ratio:.2f}; max |MLX fast - spandrel| = {diff:.2g}"
        ctx.extra["upscale"] = {"mlx_over_spandrel": ratio, "max_abs_diff": diff}
        print(f"[bench] upscale: best MLX / spandrel (torch) = {ratio:.2f}", flush=True)
    dt = str(dtype).split(".")[-1]
    what = f"4x ESRGAN ({feat} features, {blocks} blocks, {dt}) {size}x{size} -> {4 * size}x{4 * size}"
    ctx.add("upscale", what, "s", times, note)
    ctx.add("memory", f"{what}: peak above resident memory", "MiB", memory)
