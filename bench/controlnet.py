"""The controlnet section: one ControlNet txt2img step (CFG batch 2: the ControlNet, then the UNet with its
residuals) on MLX against diffusers' StableDiffusionControlNetPipeline components (ControlNetModel +
UNet2DConditionModel, what the pipeline calls per step), same random weights, same inputs, one process.

    python -m bench --sections controlnet --device gpu               # SD1.5 sizes, 64x64 latent (512x512)
    python -m bench --sections controlnet --size tiny --device cpu   # the tiny test shapes, 16x16 latent

The ControlNet is a random one in the LDM layout for the checkpoint's UNet (cldm's hint block at SD1.5
sizes), read by sdgraph's loader and converted for diffusers by its single-file converter. Both sides run
the GPU precision (fp16) or fp32 on the CPU; the maximum relative difference of the two outputs is printed.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from bench.common import OUT_DIR


def _controlnet_file(cfg, size: str):
    from sd.synthetic.controlnet import SD15_HINT, TINY_HINT, make_controlnet

    hint = SD15_HINT if size == "full" else TINY_HINT
    path = OUT_DIR / f"controlnet-{size}.safetensors"
    if not path.exists():
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        make_controlnet(path, cfg, hint, seed=0, dtype="float16" if size == "full" else "float32")
    return path, hint


def section_controlnet(ctx) -> None:
    from bench.sections import unet_inputs
    from sd.accel.compiled import FastControlNet, FastUNet
    from sd.accel.precision import default_dtype
    from sd.loading.controlnet_file import load_controlnet
    from sd.models.unet_extras import UNetExtras

    latent = ctx.args.latent
    unet, cfg = ctx.mlx("unet", ctx.args.unet_dtype)
    path, hint_channels = _controlnet_file(cfg, ctx.args.size)
    net = load_controlnet(path, default_dtype("unet"))
    x, t, c = unet_inputs(ctx, latent, cfg.context_dim)
    hint = np.random.default_rng(5).random((2, 3, latent * 8, latent * 8), dtype=np.float32)
    args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(c))
    mx_hint = mx.array(hint.transpose(0, 2, 3, 1))

    def step(u, n):
        return u(*args, extras=UNetExtras(control=n(*args, mx_hint)))

    fast_unet, fast_net = FastUNet(unet), FastControlNet(net)

    def plain_unet(*a, extras):
        return unet(*a, extras=extras)

    def fast(*a, extras):
        return fast_unet(*a, extras)

    values = {"mlx": ctx.time_mlx(lambda: step(plain_unet, net)) * 1e3,
              "mlx_fast": ctx.time_mlx(lambda: step(fast, fast_net)) * 1e3}
    what = f"ControlNet + UNet CFG step (batch 2, {latent}x{latent} latent)"
    if ctx.args.mlx_only:
        ctx.add("controlnet", what, "ms", values)
        return
    from tests.reference import diffusers_controlnet

    torch = ctx.torch
    from sd.io.checkpoint_io import open_tensors

    tensors = open_tensors(path)
    ldm = {k[len("control_model."):]: np.asarray(tensors[k], dtype=np.float32) for k in tensors}
    theirs_net = diffusers_controlnet(cfg, hint_channels, ldm).to(ctx.tdev, ctx.tdtype)
    theirs_unet = ctx.torch_model("unet")
    tx, tt = torch.from_numpy(x).to(ctx.tdev, ctx.tdtype), torch.from_numpy(t).to(ctx.tdev)
    tc = torch.from_numpy(c).to(ctx.tdev, ctx.tdtype)
    th = torch.from_numpy(hint).to(ctx.tdev, ctx.tdtype)

    def torch_step():
        down, mid = theirs_net(tx, tt, encoder_hidden_states=tc, controlnet_cond=th, return_dict=False)
        return theirs_unet(tx, tt, encoder_hidden_states=tc, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample

    values["diffusers"] = ctx.time_torch(torch_step) * 1e3
    with torch.inference_mode():
        ref = torch_step().float().cpu().numpy()
    if ctx.gpu and not ctx.args.no_torch_compile:  # both models compiled, as a tuned diffusers pipeline runs
        net_c, unet_c = torch.compile(theirs_net), torch.compile(theirs_unet)

        def compiled_step():
            down, mid = net_c(tx, tt, encoder_hidden_states=tc, controlnet_cond=th, return_dict=False)
            return unet_c(tx, tt, encoder_hidden_states=tc, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample

        start = time.perf_counter()
        with torch.inference_mode():
            compiled_step()
            torch.cuda.synchronize()
        ctx.extra["controlnet_torch_compile_s"] = time.perf_counter() - start
        values["diffusers_compile"] = ctx.time_torch(compiled_step) * 1e3
    ours = np.array(step(fast, fast_net).astype(mx.float32))
    ctx.extra["controlnet_mlx_fast_vs_diffusers_max_rel_diff"] = float(
        np.abs(ours.transpose(0, 3, 1, 2) - ref).max() / np.abs(ref).max())
    row = ctx.add("controlnet", what, "ms", values)
    for ref_name in ("diffusers", "diffusers_compile"):
        if ref_name in row.values:
            ratio = row.values["mlx_fast"] / row.values[ref_name]
            print(f"[bench] controlnet: MLX fast / {ref_name} = {ratio:.2f}", flush=True)
