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
