"""9-channel inpainting UNets: a random-weight file in the LDM layout (sd/synthetic "tiny-inpainting") loads
and runs with [x, mask, masked-image latent] through UNetExtras.concat, plain and through FastUNet, equal
to diffusers' UNet2DConditionModel(in_channels=9) built from the same file (fp32, <= 1e-4)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import diffusers_unet, read_state

from sd.loading.checkpoint import load_checkpoint
from sd.models.unet_extras import UNetExtras
from sd.synthetic import make_checkpoint

MAX_REL_ERR = 1e-4


@pytest.fixture(scope="module")
def inpainting_file(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("inpaint") / "tiny-inpainting.safetensors",
                           size="tiny-inpainting", seed=3)


@pytest.mark.slow
def test_nine_channel_unet_matches_diffusers(inpainting_file):
    from sd.accel.compiled import FastUNet

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    mask = (rng.random((2, 1, 16, 24)) > 0.5).astype(np.float32)
    masked = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    t = np.array([5.0, 640.0], dtype=np.float32)
    context = rng.standard_normal((2, 77, 64)).astype(np.float32)

    ckpt = load_checkpoint(inpainting_file, dtype="float32", parts=("unet",))
    assert ckpt.unet_config.in_channels == 9 and ckpt.unet_config.out_channels == 4
    extras = UNetExtras(concat=mx.array(np.concatenate([mask, masked], 1).transpose(0, 2, 3, 1)))
    args = (mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(context))
    plain = np.array(ckpt.unet(*args, extras=extras)).transpose(0, 3, 1, 2)
    fast = np.array(FastUNet(ckpt.unet)(*args, extras)).transpose(0, 3, 1, 2)

    model = diffusers_unet(ckpt.unet_config, read_state(inpainting_file))
    with torch.no_grad():
        sample = torch.from_numpy(np.concatenate([x, mask, masked], axis=1))  # diffusers' inpaint order
        reference = model(sample, torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)).sample
    reference = reference.numpy()
    scale = np.abs(reference).max()
    assert scale > 0.1
    for ours in (plain, fast):
        assert np.abs(ours - reference).max() / scale <= MAX_REL_ERR
    # the concat channels matter (the bound above would not notice a UNet that ignored them)
    other = UNetExtras(concat=mx.array(np.concatenate([1 - mask, masked], 1).transpose(0, 2, 3, 1)))
    assert np.abs(np.array(ckpt.unet(*args, extras=other)).transpose(0, 3, 1, 2) - reference).max() > 1e-3
