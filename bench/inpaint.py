"""The inpaint section: one CFG step of a 9-channel inpainting UNet (sd-v1-5-inpainting's shapes; input
[latent, mask, masked-image latent]) on MLX — the path the nodes run: the 4-channel latent plus the 5 concat
channels through `UNetExtras.concat` — against diffusers' UNet2DConditionModel(in_channels=9) on the same
random weights, eager and `torch.compile`d, one process.

    python -m bench --sections inpaint --device gpu               # SD1.5 sizes, 64x64 latent (512x512)
    python -m bench --sections inpaint --size tiny --device cpu   # the tiny test shapes

The UNet-only file (real LDM layout) is generated once under bench/out/. The maximum relative difference of
the two outputs is printed as a check.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from bench.common import OUT_DIR


def _unet_file(size: str):
    from sd.synthetic import make_checkpoint

    path = OUT_DIR / f"unet-inpainting-{size}.safetensors"
    if not path.exists():
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial" + path.suffix)
        make_checkpoint(tmp, size=f"{size}-inpainting", parts=("unet",),
                        dtype="float16" if size == "full" else "float32")
        tmp.rename(path)
    return path


def section_inpaint(ctx) -> None:
    from sd.accel.compiled import FastUNet
    from sd.accel.precision import default_dtype
    from sd.loading.checkpoint import load_checkpoint
    from sd.models.unet_extras import UNetExtras

    latent = ctx.args.latent
    path = _unet_file(ctx.args.size)
    ck = load_checkpoint(path, dtype=ctx.args.unet_dtype or default_dtype("unet"), parts=("unet",))
    unet, cfg = ck.unet, ck.unet_config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    concat = np.concatenate([(rng.random((2, 1, latent, latent)) > 0.5).astype(np.float32),
                             rng.standard_normal((2, 4, latent, latent)).astype(np.float32)], axis=1)
    c = rng.standard_normal((2, 77, cfg.context_dim)).astype(np.float32)
    t = np.array([500.0, 500.0], dtype=np.float32)
    args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(c))
    extras = UNetExtras(concat=mx.array(concat.transpose(0, 2, 3, 1)))
    fast = FastUNet(unet)
    values = {"mlx_fast": ctx.time_mlx(lambda: fast(*args, extras)) * 1e3}
    what = f"inpainting UNet CFG step (9 channels, batch 2, {latent}x{latent} latent)"
    if ctx.args.mlx_only:
        ctx.add("inpaint", what, "ms", values)
        return
    from tests.reference import diffusers_unet, read_state

    torch = ctx.torch
    theirs = diffusers_unet(cfg, read_state(path)).to(ctx.tdev, ctx.tdtype)
    tx = torch.from_numpy(np.concatenate([x, concat], axis=1)).to(ctx.tdev, ctx.tdtype)
    tt, tc = torch.from_numpy(t).to(ctx.tdev), torch.from_numpy(c).to(ctx.tdev, ctx.tdtype)
    values["diffusers"] = ctx.time_torch(lambda: theirs(tx, tt, encoder_hidden_states=tc).sample) * 1e3
    with torch.inference_mode():
        ref = theirs(tx, tt, encoder_hidden_states=tc).sample.float().cpu().numpy()
    if ctx.gpu and not ctx.args.no_torch_compile:
        cl = theirs.to(memory_format=torch.channels_last)
        txl = tx.contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        compiled = torch.compile(cl)
        with torch.inference_mode():
            compiled(txl, tt, encoder_hidden_states=tc)
            torch.cuda.synchronize()
        ctx.extra["inpaint_torch_compile_s"] = time.perf_counter() - start
        values["diffusers_compile"] = ctx.time_torch(
            lambda: compiled(txl, tt, encoder_hidden_states=tc).sample) * 1e3
    ours = np.array(fast(*args, extras).astype(mx.float32)).transpose(0, 3, 1, 2)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    ctx.extra["inpaint_mlx_fast_vs_diffusers_max_rel_diff"] = rel
    row = ctx.add("inpaint", what, "ms", values)
    for ref_name in ("diffusers", "diffusers_compile"):
        if ref_name in row.values:
            ratio = row.values["mlx_fast"] / row.values[ref_name]
            print(f"[bench] inpaint: MLX fast / {ref_name} = {ratio:.2f}", flush=True)
