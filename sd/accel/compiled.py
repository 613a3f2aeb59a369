"""Accelerated models: the one forward of sd/models run with `FastOps`, compiled where that pays.

`FastUNet(unet)` is callable like the UNet; `FastVAE(vae)` has the VAE's `encode` / `decode`. Each reads the
module's parameters at call time — the compiled graph takes them as inputs (`mx.compile(..., inputs=
module.state)`), not as constants — so LoRA patches or reloaded weights reach it. Options default to
`options_here`, the levers that paid on this process's device.
"""

from __future__ import annotations

import mlx.core as mx

from sd.accel.ops import FastOps, FastOptions, FusedProjections, options_here


class FastUNet:
    """`fast(x, timesteps, context)`, as `unet(x, timesteps, context)`; compiled per input shape."""

    def __init__(self, unet, opts: FastOptions | None = None):
        self.unet = unet
        self.opts = opts or options_here("unet")
        self.fused = (FusedProjections(unet, shared=self.opts.shared_projections) if self.opts.fused_qkv
                      else None)
        layout = self.fused.layout if self.fused else None

        def forward(x, t, c, fused):  # the fused weights are arguments, so new ones reach the compiled graph
            return unet(x, t, c, ops=FastOps(self.opts, fused, layout))

        self._fn = mx.compile(forward, inputs=unet.state) if self.opts.compiles else forward

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array) -> mx.array:
        return self._fn(x, timesteps, context, self.fused.weights() if self.fused else {})


class FastVAE:
    """`fast.encode(image)` / `fast.decode(latent)`, as the VAE's; each direction compiled per input shape."""

    def __init__(self, vae, opts: FastOptions | None = None):
        self.vae = vae
        self.opts = opts or options_here("vae")
        ops = FastOps(self.opts)

        def wrap(forward):
            fn = lambda x: forward(x, ops=ops)  # noqa: E731
            return mx.compile(fn, inputs=vae.state) if self.opts.compiles else fn

        self.encode = wrap(vae.encode)
        self.decode = wrap(vae.decode)


class FastUpscaler:
    """`fast(x)`, as an upscale model's call (sd/models/esrgan.py, srvgg.py); compiled per tile shape. Its
    convs run at image resolution like the VAE's, so it takes the VAE's levers."""

    def __init__(self, model, opts: FastOptions | None = None):
        self.model = model
        self.opts = opts or options_here("vae")
        self.scale, self.pad_multiple, self.dtype = model.scale, model.pad_multiple, model.dtype
        self.image_channels = model.image_channels
        ops = FastOps(self.opts)
        fn = lambda x: model(x, ops=ops)  # noqa: E731
        self._fn = mx.compile(fn, inputs=model.state) if self.opts.compiles else fn

    def __call__(self, x: mx.array) -> mx.array:
        return self._fn(x)
