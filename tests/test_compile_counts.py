"""How many graphs the accelerated UNet compiles (issue 14, item 3). On NVIDIA each new graph is compiled by
NVRTC in a new process unless MLX's kernel cache has it, so the count must depend on shapes only: not on
the seed, the prompt, the sigmas (steps, denoise, scheduler), cfg, or LoRA strengths (weights are inputs)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sd.accel.compiled import FastUNet
from sd.accel.ops import default_options
from sd.models.unet import UNetModel
from sd.sampling.ksampler import sample


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    from sd.loading.checkpoint import load_checkpoint
    from sd.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("counts") / "tiny.safetensors", seed=5)
    return load_checkpoint(path, dtype="float32").unet


@pytest.mark.slow
def test_traces_depend_on_shapes_only(unet, monkeypatch):
    traces = []
    original = UNetModel.__call__

    def counting(self, x, *args, **kwargs):
        traces.append(tuple(x.shape))  # runs only while mx.compile traces (once per new graph)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "__call__", counting)
    fast = FastUNet(unet, default_options("unet", gpu=True, cuda=False))  # the GPU's levers, compiled
    dim = unet.config.context_dim
    rng = np.random.default_rng(0)

    def prompt():
        return mx.array(rng.standard_normal((1, 77, dim)).astype(np.float32))

    latent = mx.zeros((1, 8, 8, 4))
    runs = [dict(seed=1, steps=3, cfg=7.0, sampler_name="euler", scheduler="normal"),
            dict(seed=2, steps=4, cfg=5.5, sampler_name="euler", scheduler="karras"),
            dict(seed=3, steps=3, cfg=8.0, sampler_name="dpmpp_2m", scheduler="exponential", denoise=0.6)]
    for kwargs in runs:
        mx.eval(sample(fast, prompt(), prompt(), latent, **kwargs))
    assert traces == [(2, 8, 8, 4)], traces  # one graph: the CFG batch at this size

    # a LoRA strength change patches the weights in place of the old ones: the same graph takes them
    unet.update({"out": [unet.out[0], unet.out[1], {"weight": unet.out[2].weight * 1.01}]})
    mx.eval(sample(fast, prompt(), prompt(), latent, **runs[0]))
    assert len(traces) == 1
    # a new size is a new graph (what `sdgraph warmup --size` prepares)
    mx.eval(sample(fast, prompt(), prompt(), mx.zeros((1, 8, 12, 4)), **runs[0]))
    assert traces[1:] == [(2, 8, 12, 4)]


@pytest.mark.slow
def test_controlnet_steps_stay_compiled(unet, tmp_path, monkeypatch):
    """The ControlNet compiles once per shape, and the UNet with its residuals is one more graph (the
    residuals are its inputs): new hints, strengths, seeds and steps trace nothing new."""
    from sd.accel.compiled import FastControlNet
    from sd.loading.controlnet_file import load_controlnet
    from sd.models.controlnet import ControlNet
    from sd.sampling.control import ControlSource
    from sd.synthetic.controlnet import make_controlnet

    traces = []
    for cls in (UNetModel, ControlNet):
        original = cls.__call__

        def counting(self, x, *args, _original=original, _name=cls.__name__, **kwargs):
            traces.append((_name, tuple(x.shape)))
            return _original(self, x, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counting)
    opts = default_options("unet", gpu=True, cuda=False)
    controlnet = load_controlnet(make_controlnet(tmp_path / "c.safetensors"))
    fast, net = FastUNet(unet, opts), FastControlNet(controlnet, opts)
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.standard_normal((1, 77, unet.config.context_dim)).astype(np.float32))
    for seed, strength, steps in ((1, 1.0, 3), (2, 0.5, 4)):
        source = ControlSource(net, mx.array(rng.uniform(size=(1, 64, 64, 3)).astype(np.float32)), strength)
        mx.eval(sample(fast, [(prompt, {"control": source})], [(prompt, {"control": source})],
                       mx.zeros((1, 8, 8, 4)), seed=seed, steps=steps, cfg=7.0, sampler_name="euler",
                       scheduler="normal"))
    assert traces == [("ControlNet", (2, 8, 8, 4)), ("UNetModel", (2, 8, 8, 4))], traces
