"""ControlNets in sampling: two chained ControlNets in the UNet equal diffusers' UNet fed the sum of two
ControlNetModels' residuals (ComfyUI's control_merge); strength 0 and end_percent 0 leave the sampled latents
bit-identical; workflows/controlnet.yaml runs after `sdgraph demo`."""

from __future__ import annotations

import io

import mlx.core as mx
import numpy as np
import pytest
from sd_nodes_testing import WORKFLOWS, run_cli

from nodes.demo import make_demo
from sd.loading.controlnet_file import load_controlnet
from sd.sampling.control import ControlSource
from sd.sampling.model_sampling import model_sampling_for
from sd.synthetic.controlnet import make_controlnet

MS = model_sampling_for()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sd.loading.checkpoint import load_component
    from sd.synthetic import make_checkpoint

    d = tmp_path_factory.mktemp("cn")
    unet_path = make_checkpoint(d / "unet.safetensors", parts=("unet",), seed=2)
    nets = [make_controlnet(d / f"cn{i}.safetensors", seed=10 + i) for i in range(2)]
    unet = load_component(unet_path, "unet", dtype="float32")
    return unet_path, unet, nets, [load_controlnet(p) for p in nets]


def _inputs(batch=2):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, 77, 64)).astype(np.float32)
    hints = [rng.uniform(size=(1, 64, 64, 3)).astype(np.float32) for _ in range(2)]
    return x, ctx, hints


@pytest.mark.slow  # diffusers' import takes ~15 s on a loaded 2-core machine
def test_two_chained_controlnets_equal_diffusers_sum(world):
    import torch
    from diffusers import ControlNetModel
    from reference import diffusers_unet, read_state
    from test_controlnet import _diffusers_model

    from sd.accel.compiled import FastUNet
    from sd.io.checkpoint_io import open_tensors
    from sd.models.unet import unet_config_from_weights

    unet_path, unet, net_paths, nets = world
    x, ctx, hints = _inputs()
    strengths = (0.7, 1.3)
    first = ControlSource(nets[0], mx.array(hints[0]), strengths[0])
    chain = ControlSource(nets[1], mx.array(hints[1]), strengths[1], start_percent=0.0, end_percent=1.0,
                          previous=first)
    t = mx.array([999.0, 999.0])
    extras = chain.unet_extras_at(mx.array(x), t, mx.array(ctx), [None, None], sigma=MS.sigma_max,
                                  model_sampling=MS)
    ours = unet(mx.array(x), t, mx.array(ctx), extras=extras)
    fast = FastUNet(unet)(mx.array(x), t, mx.array(ctx), extras)

    state = read_state(unet_path)
    shapes = {k[len("model.diffusion_model."):]: tuple(v.shape) for k, v in state.items()}
    theirs_unet = diffusers_unet(unet_config_from_weights(shapes), state)
    down, mid = None, None
    xt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx)
    with torch.no_grad():
        for path, hint, strength in zip(net_paths, hints, strengths, strict=True):
            tensors = open_tensors(path)
            ldm = {k[len("control_model."):]: np.asarray(tensors[k]) for k in tensors}
            model: ControlNetModel = _diffusers_model(ldm)
            d, m = model(xt, torch.tensor([999.0, 999.0]), ct,
                         controlnet_cond=torch.from_numpy(hint.transpose(0, 3, 1, 2)).repeat(2, 1, 1, 1),
                         conditioning_scale=strength, return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        theirs = theirs_unet(xt, torch.tensor([999.0, 999.0]), ct, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.array(ours), theirs, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(fast), theirs, atol=1e-4, rtol=1e-4)


def _sample(unet_fn, control):
    from sd.sampling.ksampler import sample

    x, ctx, _ = _inputs(batch=1)
    opts = {} if control is None else {"control": control}
    negative = mx.array(np.ascontiguousarray(ctx[:, ::-1]))
    return sample(unet_fn, [(mx.array(ctx), opts)], [(negative, opts)], mx.zeros((1, 8, 8, 4)), seed=3,
                  steps=3, cfg=5.0, sampler_name="euler", scheduler="normal")


@pytest.mark.slow
def test_end_percent_zero_and_strength_zero_are_bit_identical(world):
    from sd.accel.compiled import FastControlNet, FastUNet

    _, unet, _, nets = world
    fast = FastUNet(unet)
    _, _, hints = _inputs()
    net = FastControlNet(nets[0])
    plain = np.array(_sample(fast, None))
    off = np.array(_sample(fast, ControlSource(net, mx.array(hints[0]), 1.0, 0.0, 0.0)))
    assert np.array_equal(plain, off)
    on = np.array(_sample(fast, ControlSource(net, mx.array(hints[0]), 1.0)))
    assert np.abs(on - plain).max() > 1e-3  # the ControlNet does steer
    late = np.array(_sample(fast, ControlSource(net, mx.array(hints[0]), 1.0, 0.5, 1.0)))
    assert not np.array_equal(late, on) and not np.array_equal(late, plain)


def test_apply_nodes_with_strength_zero_return_their_inputs():
    from nodes.controlnet import ControlNetApply, ControlNetApplyAdvanced
    from nodes.values import Conditioning

    pos, neg = Conditioning(mx.zeros((1, 77, 64))), Conditioning(mx.ones((1, 77, 64)))
    image = mx.zeros((1, 64, 64, 3))
    assert ControlNetApplyAdvanced(pos, neg, object(), image, 0.0) == (pos, neg)
    assert ControlNetApply(pos, object(), image, 0.0) is pos
    p2, n2 = ControlNetApplyAdvanced(pos, neg, "net", image, 0.5, 0.1, 0.9)
    assert p2.entries[0].options["control"] is n2.entries[0].options["control"]  # one source, one UNet call
    p3, _ = ControlNetApplyAdvanced(p2, n2, "net2", image, 1.0)
    assert p3.entries[0].options["control"].previous is p2.entries[0].options["control"]


@pytest.mark.slow
def test_controlnet_workflow_runs_after_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo("models", "input", image_size=64, out=io.StringIO())
    args = ["--set", "width=64", "--set", "height=64", "--set", "steps=2", "--cache-dir", "cache", "-q"]
    result = run_cli("run", WORKFLOWS / "controlnet.yaml", *args)
    assert result.rc == 0, result.err
    assert result.out.split() == ["output/controlnet_00001_.png"]


@pytest.mark.slow
def test_t2i_adapter_source_steers_once_per_hint(world):
    from sd.accel.compiled import FastUNet
    from sd.models.t2i_adapter import AdapterConfig, T2IAdapter

    unet = FastUNet(world[1])
    adapter = T2IAdapter(AdapterConfig(False, 64 * 3, (32, 64, 128, 128), 1))
    mx.eval(adapter.parameters())
    calls = []

    def counted(hint):
        calls.append(hint.shape)
        return adapter(hint)

    _, _, hints = _inputs()
    plain = np.array(_sample(unet, None))
    source = ControlSource(counted, mx.array(hints[0]), 0.8, adapter=True)
    steered = np.array(_sample(unet, source))
    assert np.abs(steered - plain).max() > 1e-3
    assert calls == [(2, 64, 64, 3)]  # positive and negative share the call; features kept over the steps


def test_old_apply_gives_its_controlnet_to_the_negative():
    """ComfyUI's apply_empty_x_to_equal_area for "control": only control_apply_to_uncond entries (the old
    ControlNetApply), only when no area-less negative entry has a ControlNet; the last one reaching an entry
    stays."""
    from sd.sampling.conds import resolve

    ctx = mx.zeros((1, 77, 64))
    a, b, own = (ControlSource(None, mx.zeros((1, 8, 8, 3))) for _ in range(3))

    def negative_sources(positive, negative):
        return [c.sources for c in resolve([positive, negative], (1, 8, 8, 4), MS)[1]]

    old = {"control": a, "control_apply_to_uncond": True}
    assert negative_sources([(ctx, old)], [(ctx, {})]) == [(a,)]
    assert negative_sources([(ctx, {**old, "control_apply_to_uncond": False})], [(ctx, {})]) == [()]
    assert negative_sources([(ctx, old)], [(ctx, {"control": own})]) == [(own,)]
    two = [(ctx, old), (ctx, {"control": b, "control_apply_to_uncond": True})]
    assert negative_sources(two, [(ctx, {})]) == [(b,)]
    assert negative_sources(two, [(ctx, {}), (ctx, {})]) == [(a,), (b,)]


def test_a_controlnet_for_another_model_family_is_named(world):
    _, _, _, nets = world
    source = ControlSource(nets[0], mx.zeros((1, 64, 64, 3)), expects=(4, 1024),
                           name="sd21_canny.safetensors")
    with pytest.raises(ValueError, match="sd21_canny.safetensors was made for 4-channel latents and text "
                                         "encodings 1024 wide"):
        source.unet_extras_at(mx.zeros((1, 8, 8, 4)), mx.array([1.0]), mx.zeros((1, 77, 64)), [None],
                              sigma=1.0, model_sampling=MS)


def test_control_recipes_survive_the_disk_cache(tmp_path):
    from pathlib import Path

    from nodes.controlnet import ControlNetApplyAdvanced, ControlNetRecipe
    from nodes.values import Conditioning, FileRef, conditioning_from_bytes, conditioning_to_bytes

    nets = [ControlNetRecipe(FileRef(Path(tmp_path / f"n{i}.safetensors"), f"id{i}")) for i in range(2)]
    pos, neg = Conditioning(mx.zeros((1, 77, 64))), Conditioning(mx.ones((1, 77, 64)))
    image = mx.array(np.random.default_rng(0).uniform(size=(1, 16, 16, 3)).astype(np.float32))
    pos, neg = ControlNetApplyAdvanced(pos, neg, nets[0], image, 0.5, 0.1, 0.9)
    pos, neg = ControlNetApplyAdvanced(pos, neg, nets[1], image * 0.5, 1.0)
    back_pos = conditioning_from_bytes(conditioning_to_bytes(pos))
    back_neg = conditioning_from_bytes(conditioning_to_bytes(neg))
    original, restored = pos.entries[0].options["control"], back_pos.entries[0].options["control"]
    assert restored == original and restored == back_neg.entries[0].options["control"]
    assert hash(restored) == hash(original)
    assert restored.previous.net == nets[0] and restored.previous.strength == 0.5
    assert restored != ControlNetApplyAdvanced(pos, neg, nets[1], image, 1.0)[0].entries[0].options["control"]


def test_hint_is_sized_and_batched_as_comfyui_does():
    """common_upscale(hint, 8w, 8h, "nearest-exact", "center") and broadcast_image_to, in torch."""
    import torch

    def comfy_hint(hint, width, height, batch, chunks):
        s = torch.from_numpy(hint).movedim(-1, 1)
        old_w, old_h = s.shape[-1], s.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        s = s.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
        s = torch.nn.functional.interpolate(s, size=(height, width), mode="nearest-exact")
        if s.shape[0] != 1:
            per = batch // chunks
            s = s[:per]
            if per > s.shape[0]:
                s = torch.cat([s] * (per // s.shape[0]) + [s[:per % s.shape[0]]], dim=0)
            if s.shape[0] != batch:
                s = torch.cat([s] * chunks, dim=0)
        return s.movedim(1, -1).expand(batch, -1, -1, -1).numpy()

    rng = np.random.default_rng(2)
    for shape, latent, chunks in [((1, 40, 100, 3), (2, 8, 6, 4), 2), ((3, 90, 50, 3), (4, 8, 8, 4), 2),
                                  ((2, 64, 64, 3), (6, 4, 5, 4), 2)]:
        hint = rng.uniform(size=shape).astype(np.float32)
        source = ControlSource(None, mx.array(hint))
        ours = np.array(source._hint(latent, chunks))
        expected = comfy_hint(hint, latent[2] * 8, latent[1] * 8, latent[0], chunks)
        assert np.array_equal(ours, expected), (shape, latent)
