"""The measured sections: MLX (plain and accelerated ops) against diffusers on the same machine and file."""

from __future__ import annotations

import gc
import math
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from bench.common import Row, RSSPeak, interleaved, median_time

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"


class Context:
    """What the sections share: options, the checkpoint, lazily built models of both sides."""

    def __init__(self, args, ckpt_path):
        self.args, self.path = args, ckpt_path
        self.gpu = args.device == "gpu"
        self._mlx, self._torch_state, self._torch = {}, None, {}
        import torch

        self.torch = torch
        self.tdev = torch.device("cuda" if self.gpu else "cpu")
        self.tdtype = torch.float16 if self.gpu else torch.float32
        self.rows: list[Row] = []
        self.extra: dict = {}

    # ---- timing
    def reps(self, heavy: bool = False) -> tuple[int, int]:
        a = self.args
        if a.repeats:
            return a.warmup, a.repeats
        if self.gpu:
            return (1, 3) if heavy else (3, 10)
        return (1, 1) if (a.quick or heavy) else (1, 3)

    def time_mlx(self, fn, heavy=False, warmup=None) -> float:
        w, r = self.reps(heavy)
        w = w if warmup is None else warmup
        med, times = median_time(fn, lambda out: mx.eval(out), w, r)
        return med

    def time_torch(self, fn, heavy=False, warmup=None) -> float:
        torch = self.torch
        w, r = self.reps(heavy)
        w = w if warmup is None else warmup

        def sync(_):
            if self.gpu:
                torch.cuda.synchronize()

        with torch.inference_mode():
            med, _ = median_time(fn, sync, w, r)
        return med

    def add(self, section, what, unit, values, note=""):
        row = Row(section, what, unit, values, note)
        self.rows.append(row)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(f"[bench] {section} / {what}: {shown} {unit} {note}", flush=True)
        return row

    # ---- models
    def mlx(self, part: str, dtype=None):
        from sd.loading.checkpoint import load_checkpoint

        key = (part, str(dtype))
        if key not in self._mlx:
            ck = load_checkpoint(self.path, dtype=dtype, parts=(part,))
            self._mlx[key] = (getattr(ck, part), getattr(ck, f"{part}_config"))
        return self._mlx[key]

    def torch_state(self):
        if self._torch_state is None:
            from tests.reference import read_state

            self._torch_state = read_state(self.path)
        return self._torch_state

    def torch_model(self, part: str, dtype=None, channels_last=False):
        from tests import reference

        dtype = dtype or self.tdtype
        key = (part, str(dtype), channels_last)
        if key not in self._torch:
            _, cfg = self.mlx(part, "float32" if not self.gpu else None)
            state = self.torch_state()
            prefix = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                      "clip": "cond_stage_model.transformer."}[part]
            sub = {k: v for k, v in state.items() if k.startswith(prefix)}
            if part == "unet":
                model = reference.diffusers_unet(cfg, sub)
            elif part == "vae":
                model = reference.diffusers_vae(cfg, sub)
            else:
                model = reference.transformers_clip(cfg, sub)
            model = model.to(self.tdev, dtype)
            if channels_last:
                model = model.to(memory_format=self.torch.channels_last)
            self._torch[key] = model
        return self._torch[key]


def settle_mlx() -> None:
    """Wait until MLX has released what finished work held: its CUDA backend frees a step's buffers when the
    GPU reports them done, after mx.eval has returned."""
    gc.collect()
    mx.synchronize()


def mlx_working_memory(fn) -> float:
    """MiB allocated by one call above what was resident before it (MLX's peak active memory)."""
    mx.eval(fn())
    settle_mlx()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    settle_mlx()
    return (mx.get_peak_memory() - base) / 2**20


def torch_working_memory(ctx, fn) -> float | None:
    torch = ctx.torch
    if not ctx.gpu:
        return None
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------ UNet
def unet_inputs(ctx: Context, latent: int, context_dim: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    c = rng.standard_normal((2, 77, context_dim)).astype(np.float32)
    t = np.array([500.0, 500.0], dtype=np.float32)
    return x, t, c


def section_unet(ctx: Context):
    from sd.accel.compiled import FastUNet

    torch = ctx.torch
    latent = ctx.args.latent
    unet, cfg = ctx.mlx("unet", ctx.args.unet_dtype)
    x, t, c = unet_inputs(ctx, latent, cfg.context_dim)
    mx_args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(c))
    values = {}
    values["mlx"] = ctx.time_mlx(lambda: unet(*mx_args)) * 1e3
    fast = FastUNet(unet)
    values["mlx_fast"] = ctx.time_mlx(lambda: fast(*mx_args)) * 1e3
    mem = {"mlx": mlx_working_memory(lambda: unet(*mx_args)),
           "mlx_fast": mlx_working_memory(lambda: fast(*mx_args))}
    if ctx.args.mlx_only:
        ctx.add("memory", "UNet CFG step: peak above resident memory", "MiB", mem)
        return ctx.add("unet", f"CFG step (batch 2, {latent}x{latent} latent)", "ms", values)
    tx = torch.from_numpy(x).to(ctx.tdev, ctx.tdtype)
    tt = torch.from_numpy(t).to(ctx.tdev)
    tc = torch.from_numpy(c).to(ctx.tdev, ctx.tdtype)
    model = ctx.torch_model("unet")
    values["diffusers"] = ctx.time_torch(lambda: model(tx, tt, encoder_hidden_states=tc).sample) * 1e3
    with torch.inference_mode():  # both sides compute the same thing (max relative difference)
        ref = model(tx, tt, encoder_hidden_states=tc).sample.float().cpu().numpy()
    ours = np.array(fast(*mx_args).astype(mx.float32)).transpose(0, 3, 1, 2)
    ctx.extra["unet_mlx_fast_vs_diffusers_max_rel_diff"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
    if ctx.gpu or ctx.args.torch_variants:
        cl = ctx.torch_model("unet", channels_last=True)
        txl = tx.contiguous(memory_format=torch.channels_last)
        values["diffusers_cl"] = ctx.time_torch(lambda: cl(txl, tt, encoder_hidden_states=tc).sample) * 1e3
        if not ctx.args.no_torch_compile:
            start = time.perf_counter()
            compiled = torch.compile(cl)
            with torch.inference_mode():
                compiled(txl, tt, encoder_hidden_states=tc)
                if ctx.gpu:
                    torch.cuda.synchronize()
            ctx.extra["torch_compile_s"] = time.perf_counter() - start
            values["diffusers_compile"] = ctx.time_torch(
                lambda: compiled(txl, tt, encoder_hidden_states=tc).sample) * 1e3
            ctx._torch["unet_compiled"] = compiled
    if ctx.gpu:
        mem["diffusers"] = torch_working_memory(ctx, lambda: model(tx, tt, encoder_hidden_states=tc).sample)
        if "unet_compiled" in ctx._torch:
            mem["diffusers_compile"] = torch_working_memory(
                ctx, lambda: ctx._torch["unet_compiled"](txl, tt, encoder_hidden_states=tc).sample)
    row = ctx.add("unet", f"CFG step (batch 2, {latent}x{latent} latent)", "ms", values)
    ctx.add("memory", "UNet CFG step: peak above resident memory (GPU)" if ctx.gpu else
            "UNet CFG step: MLX peak above resident memory", "MiB",
            {k: v for k, v in mem.items() if v is not None})
    return row


def section_unet_rr(ctx: Context):
    """UNet CFG step, MLX plain / MLX fast / diffusers timed round-robin (one run of each per round), so a
    machine whose load changes during the run (a shared CPU) weighs on all three alike."""
    import statistics

    from sd.accel.compiled import FastUNet

    torch = ctx.torch
    latent = ctx.args.latent
    unet, cfg = ctx.mlx("unet", ctx.args.unet_dtype)
    x, t, c = unet_inputs(ctx, latent, cfg.context_dim)
    mx_args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(c))
    fast = FastUNet(unet)
    model = ctx.torch_model("unet")
    tx, tt = torch.from_numpy(x).to(ctx.tdev, ctx.tdtype), torch.from_numpy(t).to(ctx.tdev)
    tc = torch.from_numpy(c).to(ctx.tdev, ctx.tdtype)

    def run_torch():
        with torch.inference_mode():
            model(tx, tt, encoder_hidden_states=tc)
            if ctx.gpu:
                torch.cuda.synchronize()

    impls = {"mlx": lambda: mx.eval(unet(*mx_args)), "mlx_fast": lambda: mx.eval(fast(*mx_args)),
             "diffusers": run_torch}
    rounds = ctx.args.repeats or 3

    def progress(r, times):
        print(f"[bench] unet_rr round {r + 1}: " + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items()),
              flush=True)

    times = interleaved(impls, rounds, on_round=progress)  # the warm-up call also compiles
    ctx.extra["unet_rr_rounds_s"] = times
    return ctx.add("unet", f"CFG step (batch 2, {latent}x{latent} latent), round-robin x{rounds}", "ms",
                   {k: statistics.median(v) * 1e3 for k, v in times.items()})


# ------------------------------------------------------------------------------------------- VAE
def section_vae(ctx: Context):
    from sd.accel.compiled import FastVAE

    torch = ctx.torch
    size = ctx.args.image
    vae, _ = ctx.mlx("vae", ctx.args.vae_dtype)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    img = np.clip(rng.standard_normal((1, 3, size, size)).astype(np.float32) * 0.5, -1, 1)
    mz, mimg = mx.array(z.transpose(0, 2, 3, 1)), mx.array(img.transpose(0, 2, 3, 1))
    dec = {"mlx": ctx.time_mlx(lambda: vae.decode(mz), heavy=True) * 1e3}
    fast = FastVAE(vae).decode
    dec["mlx_fast"] = ctx.time_mlx(lambda: fast(mz), heavy=True) * 1e3
    enc = {"mlx": ctx.time_mlx(lambda: vae.encode(mimg), heavy=True) * 1e3}
    fast_enc = FastVAE(vae).encode
    enc["mlx_fast"] = ctx.time_mlx(lambda: fast_enc(mimg), heavy=True) * 1e3
    mem = {"mlx": mlx_working_memory(lambda: vae.decode(mz)),
           "mlx_fast": mlx_working_memory(lambda: fast(mz))}
    if not ctx.args.mlx_only:
        dtypes = [ctx.tdtype] + ([torch.float32] if ctx.gpu else [])
        for dt in dtypes:
            name = "diffusers" if dt == ctx.tdtype else "diffusers_fp32"
            model = ctx.torch_model("vae", dtype=dt)
            tz = torch.from_numpy(z).to(ctx.tdev, dt)
            ti = torch.from_numpy(img).to(ctx.tdev, dt)
            dec[name] = ctx.time_torch(lambda: model.decode(tz).sample, heavy=True) * 1e3  # noqa: B023
            if ctx.gpu:
                mem[name] = torch_working_memory(ctx, lambda: model.decode(tz).sample)  # noqa: B023
            enc[name] = ctx.time_torch(lambda: model.encode(ti).latent_dist.mode(), heavy=True) * 1e3  # noqa: B023
    vdt = str(vae.decoder.conv_in.weight.dtype).split(".")[-1]
    ctx.add("vae", f"decode {size}x{size} (MLX {vdt})", "ms", dec)
    ctx.add("vae", f"encode {size}x{size} (MLX {vdt})", "ms", enc)
    ctx.add("memory", f"VAE decode {size}x{size}: peak above resident memory", "MiB", mem)


# ------------------------------------------------------------------------------------------ CLIP
def section_clip(ctx: Context):
    from sd.models.clip import encode_tokens
    from sd.text.tokenizer import default_tokenizer

    torch = ctx.torch
    clip, _ = ctx.mlx("clip", None)
    tok = default_tokenizer()
    ids = [([49406] + tok.encode(p)[:75] + [49407] * 77)[:77] for p in (PROMPT, NEGATIVE)]
    ids = np.array(ids, dtype=np.int64)
    m_ids = mx.array(ids.astype(np.int32))
    values = {"mlx": ctx.time_mlx(lambda: encode_tokens(clip, m_ids)[0]) * 1e3}
    if not ctx.args.mlx_only:
        model = ctx.torch_model("clip")
        t_ids = torch.from_numpy(ids).to(ctx.tdev)
        values["diffusers"] = ctx.time_torch(lambda: model(t_ids).last_hidden_state) * 1e3
    ctx.add("clip", "text encode (batch 2 x 77 tokens)", "ms", values)


# --------------------------------------------------------------------------------------- txt2img
def _mlx_txt2img(ctx, steps, unet_fn, clip, decode):
    from sd.sampling.ksampler import sample
    from sd.text.encode import encode_prompt

    size = ctx.args.image

    def run():
        pos = encode_prompt(clip, PROMPT)[0]
        neg = encode_prompt(clip, NEGATIVE)[0]
        latent = mx.zeros((1, size // 8, size // 8, 4))
        out = sample(unet_fn, pos, neg, latent, seed=42, steps=steps, cfg=7.5, sampler_name="euler",
                     scheduler="normal")
        return decode(out)

    return run


def euler_scheduler():
    """diffusers' Euler sampler with SD1.5's schedule (scaled_linear 0.00085..0.012, 1000 steps, eps)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type="epsilon",
                                  timestep_spacing="linspace", steps_offset=1)


def _torch_txt2img(ctx, steps, unet, clip, vae):
    from sd.text.tokenizer import default_tokenizer

    torch = ctx.torch
    size = ctx.args.image
    tok = default_tokenizer()
    ids = [([49406] + tok.encode(p)[:75] + [49407] * 77)[:77] for p in (NEGATIVE, PROMPT)]
    ids = torch.tensor(ids, device=ctx.tdev)
    sched = euler_scheduler()
    vae_dtype = next(vae.parameters()).dtype

    def run():
        cond = clip(ids).last_hidden_state.to(ctx.tdtype)
        sched.set_timesteps(steps, device=ctx.tdev)
        gen = torch.Generator("cpu").manual_seed(42)
        lat = torch.randn((1, 4, size // 8, size // 8), generator=gen).to(ctx.tdev) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t).to(ctx.tdtype)
            eps = unet(inp, t, encoder_hidden_states=cond).sample
            un, co = eps.float().chunk(2)
            lat = sched.step(un + 7.5 * (co - un), t, lat).prev_sample
        return vae.decode((lat / 0.18215).to(vae_dtype)).sample

    return run


def section_txt2img(ctx: Context):
    from sd.accel.compiled import FastUNet, FastVAE

    torch = ctx.torch
    steps = ctx.args.steps
    unet, _ = ctx.mlx("unet", ctx.args.unet_dtype)
    vae, _ = ctx.mlx("vae", ctx.args.vae_dtype)
    clip, _ = ctx.mlx("clip", None)
    times, mem, work, weights = {}, {}, {}, {}
    fast_unet = FastUNet(unet)
    # the fast path first: the plain modules' far larger peak must not linger into its measurement
    runs = {"mlx_fast": _mlx_txt2img(ctx, steps, fast_unet, clip, FastVAE(vae).decode),
            "mlx": _mlx_txt2img(ctx, steps, unet, clip, vae.decode)}
    for name, run in runs.items():
        mx.eval(run())  # warm (compiles)
        settle_mlx()
        mx.reset_peak_memory()
        with RSSPeak() as rss:
            times[name] = ctx.time_mlx(run, heavy=True, warmup=0)
            settle_mlx()
        mem[name] = (mx.get_peak_memory() if ctx.gpu else rss.peak - rss.start) / 2**20
    if ctx.gpu:
        # the peak above counts every array alive in the process; these two rows do not depend on what
        # earlier sections left resident (on the torch side: the channels-last and compiled UNets)
        work["mlx_fast"] = mlx_working_memory(runs["mlx_fast"])
        fused = fast_unet.fused.weights().values() if fast_unet.fused else []
        params = [v for m in (unet, vae, clip) for _, v in tree_flatten(m.parameters())]
        weights["mlx_fast"] = (sum(v.nbytes for v in params) + sum(w.nbytes for w in fused)) / 2**20
    if not ctx.args.mlx_only:
        variants = {"diffusers": ctx.torch_model("unet")}
        if "unet_compiled" in ctx._torch:
            variants["diffusers_compile"] = ctx._torch["unet_compiled"]
        # diffusers' pipelines upcast the SD1.x VAE to fp32 (force_upcast) to avoid fp16 overflow
        tvae = ctx.torch_model("vae", dtype=torch.float32)
        tclip = ctx.torch_model("clip")
        for name, tunet in variants.items():
            run = _torch_txt2img(ctx, steps, tunet, tclip, tvae)
            with torch.inference_mode():
                run()  # warm
            if ctx.gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with RSSPeak() as rss:
                times[name] = ctx.time_torch(run, heavy=True, warmup=0)
            mem[name] = (torch.cuda.max_memory_allocated() if ctx.gpu else rss.peak - rss.start) / 2**20
            if ctx.gpu:
                work[name] = torch_working_memory(ctx, run)
                weights[name] = sum(p.numel() * p.element_size() for m in (tunet, tvae, tclip)
                                    for p in m.parameters()) / 2**20
    size = ctx.args.image
    ctx.add("txt2img", f"{size}x{size}, {steps} steps euler, CFG (encode+sample+decode)", "s", times)
    what = "peak GPU memory (mx.get_peak_memory / torch.cuda.max_memory_allocated)" if ctx.gpu else \
        "peak RSS growth during the run (both sides share the process)"
    ctx.add("memory", f"txt2img {size}x{size}: {what}", "MiB", mem)
    if work:
        ctx.add("memory", f"txt2img {size}x{size}: working memory (peak above resident, weights excluded)",
                "MiB", work)
        ctx.add("memory", f"txt2img {size}x{size}: weights of the models it runs", "MiB", weights)


def section_upscale(ctx: Context):
    from bench.upscale import section_upscale as run

    run(ctx)


def section_controlnet(ctx: Context):
    from bench.controlnet import section_controlnet as run

    run(ctx)


def section_inpaint(ctx: Context):
    from bench.inpaint import section_inpaint as run

    run(ctx)


SECTIONS = {"unet": section_unet, "unet_rr": section_unet_rr, "vae": section_vae, "clip": section_clip,
            "txt2img": section_txt2img, "upscale": section_upscale, "controlnet": section_controlnet,
            "inpaint": section_inpaint}


def ratio_table(rows: list[Row]) -> str:
    refs = ["diffusers", "diffusers_cl", "diffusers_compile", "spandrel"]
    impls = []
    for r in rows:
        for k in r.values:
            if k not in impls:
                impls.append(k)
    head = ["section", "what", "unit", *impls] + [f"best MLX / {r}" for r in refs
                                                   if any(r in row.values for row in rows)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.section, r.what, r.unit]
        for k in impls:
            v = r.values.get(k)
            cells.append("" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}"))
        best = min((v for k, v in r.values.items() if k.startswith("mlx")), default=math.nan)
        for ref in refs:
            if any(ref in row.values for row in rows):
                cells.append(f"{best / r.values[ref]:.2f}" if ref in r.values else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
