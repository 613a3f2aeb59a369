"""Accelerated models: the one forward of sd/models run with `FastOps`, compiled where that pays.

`FastUNet(unet)` is callable like the UNet; `FastVAE(vae)` has the VAE's `encode` / `decode`. Each reads the
module's parameters at call time — the compiled graph takes them as inputs (`mx.compile(..., inputs=
module.state)`), not as constants — so LoRA patches or reloaded weights reach it. Options default to
`options_here`, the levers that paid on this process's device.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from sd.accel import gpu_cache
from sd.accel.ops import FastOps, FastOptions, FusedProjections, options_here
from sd.models.unet_extras import ControlResiduals, ModulePatch, UNetExtras


class FastUNet:
    """`fast(x, timesteps, context, extras=None)`, as `unet(x, timesteps, context, extras=...)`; compiled per
    input shape. Extras that are arrays (concat channels, control residuals) or module patches (GLIGEN: a
    module's state and arrays) are inputs of a compiled graph of their own; extras with Python hooks
    (attention or block patches) run the same forward uncompiled, since a compiled graph would keep the first
    hook it saw."""

    def __init__(self, unet, opts: FastOptions | None = None):
        self.unet = unet
        self.opts = opts or options_here("unet")
        self.fused = (FusedProjections(unet, shared=self.opts.shared_projections) if self.opts.fused_qkv
                      else None)
        layout = self.fused.layout if self.fused else None

        def forward(x, t, c, fused):  # the fused weights are arguments, so new ones reach the compiled graph
            return unet(x, t, c, ops=FastOps(self.opts, fused, layout))

        def forward_extras(x, t, c, fused, arrays, shape, modules):
            extras = _extras_from(arrays, shape, modules)
            return unet(x, t, c, ops=FastOps(self.opts, fused, layout), extras=extras)

        self._forward_extras = forward_extras
        self._forward_plain = forward
        self._fn = _compiled(forward, unet, self.opts, "unet")
        # one compiled graph per arrangement of array extras (and of the patch modules, kept alive here)
        self._with_extras: dict[tuple, tuple] = {}

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array,
                 extras: UNetExtras | None = None) -> mx.array:
        fused = self.fused.weights() if self.fused else {}
        if extras is None or extras.is_empty:
            return self._fn(x, timesteps, context, fused)
        if extras.has_hooks or self._fn is self._forward_plain:
            layout = self.fused.layout if self.fused else None
            return self.unet(x, timesteps, context, ops=FastOps(self.opts, fused, layout), extras=extras)
        arrays, shape, modules = _arrays_of(extras)
        entry = self._with_extras.get(shape)
        if entry is None:
            fn = partial(self._forward_extras, shape=shape, modules=modules)
            arrangement = repr([part for part in shape[:-1]] + [shape[-1][2]])  # the patch modules by count
            if gpu_cache.wants_compile(gpu_cache.graph_key(f"unet+{arrangement}", self.unet, self.opts)):
                fn = mx.compile(fn, inputs=[self.unet.state, *(m.state for m in modules)])
            entry = self._with_extras[shape] = (fn, modules)
        return entry[0](x, timesteps, context, fused, arrays)


def _compiled(fn, module, opts: FastOptions, name: str):
    """`fn` compiled with the module's parameters as inputs, where the levers and the GPU's kernel cache
    say so (sd/accel/gpu_cache.py: on NVIDIA a first run goes uncompiled); else `fn` itself."""
    if opts.compiles and gpu_cache.wants_compile(gpu_cache.graph_key(name, module, opts)):
        return mx.compile(fn, inputs=module.state)
    return fn


def _arrays_of(extras: UNetExtras) -> tuple[list[mx.array], tuple, tuple]:
    """The arrays of hook-free extras as a flat list, the arrangement that rebuilds them and the patch
    modules (by identity in the arrangement)."""
    control = extras.control or ControlResiduals()
    parts = {"concat": [extras.concat], "input": list(control.input), "middle": [control.middle],
             "output": list(control.output)}
    arrays, shape = [], []
    for name, values in parts.items():
        present = tuple(i for i, v in enumerate(values) if v is not None)
        shape.append((name, len(values), present, extras.control is not None))
        arrays += [values[i] for i in present]
    modules = tuple(p.module for p in extras.middle_patch)
    counts = tuple(len(p.arrays) for p in extras.middle_patch)
    shape.append(("modules", tuple(id(m) for m in modules), counts))
    for p in extras.middle_patch:
        arrays += list(p.arrays)
    return arrays, tuple(shape), modules


def _extras_from(arrays: list[mx.array], shape: tuple, modules: tuple = ()) -> UNetExtras:
    it = iter(arrays)
    parts = {}
    for name, length, present, _ in shape[:-1]:
        values = [None] * length
        for i in present:
            values[i] = next(it)
        parts[name] = values
    control = (ControlResiduals(tuple(parts["input"]), parts["middle"][0], tuple(parts["output"]))
               if shape[0][3] else None)
    counts = shape[-1][2]
    patches = tuple(ModulePatch(m, tuple(next(it) for _ in range(n)))
                    for m, n in zip(modules, counts, strict=True))
    return UNetExtras(concat=parts["concat"][0], control=control, middle_patch=patches)


class FastVAE:
    """`fast.encode(image)` / `fast.decode(latent)`, as the VAE's; each direction compiled per input shape."""

    def __init__(self, vae, opts: FastOptions | None = None):
        self.vae = vae
        self.opts = opts or options_here("vae")
        ops = FastOps(self.opts)

        def wrap(forward, name):
            return _compiled(lambda x: forward(x, ops=ops), vae, self.opts, name)

        self.encode = wrap(vae.encode, "vae.encode")
        self.decode = wrap(vae.decode, "vae.decode")


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
        self._fn = _compiled(fn, model, self.opts, "upscaler")

    def __call__(self, x: mx.array) -> mx.array:
        return self._fn(x)


class FastControlNet:
    """`fast(x, timesteps, context, hint) -> ControlResiduals`, as the ControlNet's call
    (sd/models/controlnet.py), with the UNet's ops and fused projections; compiled per input shape. Its
    residuals are arrays, so they enter FastUNet's compiled graph as inputs."""

    def __init__(self, net, opts: FastOptions | None = None):
        self.net = net
        self.opts = opts or options_here("unet")
        self.fused = (FusedProjections(net, shared=self.opts.shared_projections) if self.opts.fused_qkv
                      else None)
        layout = self.fused.layout if self.fused else None

        def forward(x, t, c, hint, fused):
            out = net(x, t, c, hint, ops=FastOps(self.opts, fused, layout))
            return [*out.output, out.middle]

        self._fn = _compiled(forward, net, self.opts, "controlnet")

    def __call__(self, x: mx.array, timesteps: mx.array, context: mx.array,
                 hint: mx.array) -> ControlResiduals:
        outs = self._fn(x, timesteps, context, hint, self.fused.weights() if self.fused else {})
        return ControlResiduals(output=tuple(outs[:-1]), middle=outs[-1])
