"""ControlNet: the MLX model against diffusers' ControlNetModel on the same random weights (LDM layout through
diffusers' single-file converter, and the diffusers layout itself), and the loader's layouts."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.loading.controlnet_file import load_controlnet
from sd.synthetic.controlnet import TINY_HINT, make_controlnet, random_controlnet
from sd.synthetic.unet import TINY_UNET

TOL = 1e-4


def _diffusers_model(ldm: dict):
    from reference import diffusers_controlnet

    return diffusers_controlnet(TINY_UNET, TINY_HINT, ldm)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    hint = rng.uniform(size=(2, 3, 64, 64)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, TINY_UNET.context_dim)).astype(np.float32)
    t = np.array([999.0, 311.0], dtype=np.float32)
    return x, hint, ctx, t


def _compare(ours, theirs_model):
    x, hint, ctx, t = _inputs()
    with torch.no_grad():
        down, mid = theirs_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                                 controlnet_cond=torch.from_numpy(hint), return_dict=False)
    res = ours(mx.array(x.transpose(0, 2, 3, 1)), mx.array(t), mx.array(ctx),
               mx.array(hint.transpose(0, 2, 3, 1)))
    assert len(res.output) == len(down)
    for a, b in zip(res.output, down, strict=True):
        np.testing.assert_allclose(np.array(a).transpose(0, 3, 1, 2), b.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.array(res.middle).transpose(0, 3, 1, 2), mid.numpy(), atol=TOL, rtol=TOL)


@pytest.mark.slow  # diffusers import ~15 s on a loaded machine
def test_ldm_layout_equals_diffusers(tmp_path):
    ldm = random_controlnet(seed=3)
    ours = load_controlnet(make_controlnet(tmp_path / "cn.safetensors", seed=3))
    _compare(ours, _diffusers_model(ldm))


@pytest.mark.slow
def test_diffusers_layout_equals_diffusers(tmp_path):
    from safetensors.torch import save_file

    ldm = {k: v.astype(np.float16).astype(np.float32) for k, v in random_controlnet(seed=4).items()}
    theirs = _diffusers_model(ldm)
    path = tmp_path / "diffusion_pytorch_model.fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in theirs.state_dict().items()}, str(path))
    _compare(load_controlnet(path), theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name,prefix,dtype", [("cn.pth", "control_model.", "float16"),
                                                ("cn.safetensors", "", "float32")])
def test_layouts_and_formats_load_the_same_weights(tmp_path, name, prefix, dtype):
    ref = load_controlnet(make_controlnet(tmp_path / "ref.safetensors", seed=5, dtype=dtype))
    other = load_controlnet(make_controlnet(tmp_path / name, seed=5, dtype=dtype, prefix=prefix))
    from mlx.utils import tree_flatten

    pairs = zip(tree_flatten(ref.parameters()), tree_flatten(other.parameters()), strict=True)
    for (ka, a), (kb, b) in pairs:
        assert ka == kb and mx.array_equal(a, b)


def test_not_a_controlnet_names_the_file(tmp_path):
    from sd.errors import CheckpointError
    from sd.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors.*not a ControlNet"):
        load_controlnet(path)


@pytest.mark.slow
def test_diff_controlnet_adds_the_unet_weights(tmp_path):
    from mlx.utils import tree_flatten

    from sd.errors import ArchitectureError
    from sd.loading.checkpoint import load_component
    from sd.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path / "m.safetensors", parts=("unet",))
    unet = load_component(path, "unet", dtype="float32")
    unet_weights = dict(tree_flatten(unet.parameters()))
    plain = load_controlnet(make_controlnet(tmp_path / "plain.safetensors", seed=6))
    diff_path = make_controlnet(tmp_path / "diff.safetensors", seed=6,
                                extra={"difference": np.zeros((1,), np.float32)})
    with pytest.raises(ArchitectureError, match="DiffControlNetLoader"):
        load_controlnet(diff_path)
    diff = dict(tree_flatten(load_controlnet(diff_path, unet_weights=unet_weights).parameters()))
    for name, value in tree_flatten(plain.parameters()):
        expected = value + unet_weights[name] if name in unet_weights else value
        assert mx.allclose(diff[name], expected, atol=1e-6), name
    assert "input_blocks.1.0.in_layers.2.weight" in unet_weights
    assert "zero_convs.0.0.weight" not in unet_weights
