"""T2I-Adapter (sd/models/t2i_adapter.py) against diffusers' T2IAdapter (full and light) on the same random
weights, in diffusers' layout and in TencentARC's (ComfyUI's) layout; and its features in the UNet where
ComfyUI adds them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.loading.controlnet_file import load_controlnet
from sd.models.t2i_adapter import T2IAdapter


def _diffusers(kind: str, channels, blocks, in_channels=3, seed=0):
    from diffusers import T2IAdapter as Theirs

    torch.manual_seed(seed)
    model = Theirs(in_channels=in_channels, channels=list(channels), num_res_blocks=blocks,
                   downscale_factor=8, adapter_type=kind).eval()
    with torch.no_grad():  # diffusers initialises some layers to zero; make every path count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / max(1.0, float(np.sqrt(p[0].numel()))))
    return model


def _tencent_names(state: dict, light: bool, blocks: int) -> dict:
    """diffusers' adapter.* keys -> the original (TencentARC) names ComfyUI reads."""
    import re

    out = {}
    for k, v in state.items():
        m = re.match(r"adapter\.body\.(\d+)\.(resnets\.(\d+)\.)?(.+)$", k)
        if m is None:
            out[k.removeprefix("adapter.")] = v
        elif light:
            out[f"body.{m.group(1)}." + (f"body.{m.group(3)}.{m.group(4)}" if m.group(3) else m.group(4))] = v
        else:
            out[f"body.{int(m.group(1)) * blocks + int(m.group(3) or 0)}.{m.group(4)}"] = v
    return out


CASES = [("full_adapter", (32, 64, 128, 128), 2, 3, False), ("full_adapter", (32, 64, 128, 128), 2, 1, True),
         ("light_adapter", (32, 64, 128), 2, 3, False), ("light_adapter", (32, 64, 128), 3, 3, True)]


@pytest.mark.slow  # diffusers' import takes ~15 s on a loaded 2-core machine
@pytest.mark.parametrize("kind,channels,blocks,cin,tencent", CASES)
def test_adapter_equals_diffusers(tmp_path, kind, channels, blocks, cin, tencent):
    from safetensors.torch import save_file

    theirs = _diffusers(kind, channels, blocks, cin)
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    if tencent:
        state = _tencent_names(state, kind == "light_adapter", blocks)
    save_file(state, str(tmp_path / "adapter.safetensors"))
    ours = load_controlnet(tmp_path / "adapter.safetensors")
    assert isinstance(ours, T2IAdapter)
    # even sides at every level: on odd ones ComfyUI's padded pooling (ours) and diffusers' ceil_mode differ
    hint = np.random.default_rng(1).uniform(size=(2, cin, 64, 128)).astype(np.float32)
    with torch.no_grad():
        expected = [f.numpy() for f in theirs(torch.from_numpy(hint))]
    got = ours(mx.array(hint.transpose(0, 2, 3, 1))).input
    assert [i for i, f in enumerate(got) if f is not None] == [3 * i + 2 for i in range(len(expected))]
    for a, b in zip([f for f in got if f is not None], expected, strict=True):
        np.testing.assert_allclose(np.array(a).transpose(0, 3, 1, 2), b, atol=1e-4, rtol=1e-4)


def test_adapter_features_reach_the_unet_input_blocks():
    """ComfyUI adds feature i to input block 3i + 2's output; our UNet adds ControlResiduals.input there."""
    from sd.models.unet import UNetModel
    from sd.models.unet_extras import ControlResiduals, UNetExtras
    from sd.synthetic.unet import TINY_UNET

    unet = UNetModel(TINY_UNET)
    mx.eval(unet.parameters())
    x, t, c = mx.random.normal((1, 8, 8, 4)), mx.array([10.0]), mx.random.normal((1, 77, 64))
    base = unet(x, t, c)
    feature = mx.ones((1, 8, 8, 32))
    steered = unet(x, t, c, extras=UNetExtras(control=ControlResiduals(input=(None, None, feature))))
    assert not mx.array_equal(base, steered)
