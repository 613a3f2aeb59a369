"""The conditioning operation nodes set ComfyUI's options (nodes.py: ConditioningSetArea & co.) and
combine tensors as its nodes do; the area-composition workflow runs end to end, and with its areas at
strength 0 it is the plain text-to-image of its scene prompt, pixel for pixel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, pixels, run

from nodes.conditioning_ops import (
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
    ConditioningZeroOut,
)
from nodes.values import CondEntry, Conditioning


def _cond(rng, length=77, pooled=True, options=None):
    arr = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return Conditioning(entries=[CondEntry(arr(1, length, 8), arr(1, 8) if pooled else None, options or {})])


def test_set_area_nodes_store_comfyui_options():
    c = _cond(np.random.default_rng(0))
    area = ConditioningSetArea(c, width=200, height=136, x=20, y=9, strength=1.5)
    want = {"area": (17, 25, 1, 2), "strength": 1.5, "set_area_to_bounds": False}
    assert dict(area.entries[0].options) == want
    pct = ConditioningSetAreaPercentage(c, width=0.5, height=0.25, x=0.1, y=0.2, strength=0.8)
    assert pct.entries[0].options["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    assert ConditioningSetAreaStrength(pct, 2.0).entries[0].options["strength"] == 2.0
    timed = ConditioningSetTimestepRange(area, start=0.2, end=0.7)
    assert timed.entries[0].options["start_percent"] == 0.2 and timed.entries[0].options["end_percent"] == 0.7
    assert timed.entries[0].options["area"] == (17, 25, 1, 2)  # earlier options are kept
    assert dict(c.entries[0].options) == {}  # the input is never changed


def test_set_mask_adds_a_batch_axis_and_bounds_flag():
    c = _cond(np.random.default_rng(1))
    out = ConditioningSetMask(c, mx.ones((16, 16)), strength=0.7, set_cond_area="mask bounds")
    opts = out.entries[0].options
    assert opts["mask"].shape == (1, 16, 16) and opts["mask_strength"] == 0.7 and opts["set_area_to_bounds"]
    assert not ConditioningSetMask(c, mx.ones((1, 4, 4))).entries[0].options["set_area_to_bounds"]


def test_combine_keeps_every_entry_in_order():
    rng = np.random.default_rng(2)
    a, b = _cond(rng), ConditioningCombine(_cond(rng), _cond(rng))
    out = ConditioningCombine(a, b)
    assert [e.cond for e in out] == [a.cond] + [e.cond for e in b]


def test_concat_appends_the_first_from_entry_to_each_entry():
    rng = np.random.default_rng(3)
    to = ConditioningCombine(_cond(rng, options={"strength": 0.5}), _cond(rng, 154))
    source = ConditioningCombine(_cond(rng), _cond(rng))
    out = ConditioningConcat(to, source)
    for before, after in zip(to, out, strict=True):
        want = np.concatenate([np.array(before.cond), np.array(source.cond)], axis=1)
        assert np.array_equal(np.array(after.cond), want) and after.options == before.options
        assert after.pooled is before.pooled


def _comfy_average(t1, pooled_to, cond_from, pooled_from, w):
    """ComfyUI's ConditioningAverage for one entry, in numpy."""
    t0 = cond_from[:, : t1.shape[1]]
    if t0.shape[1] < t1.shape[1]:
        t0 = np.concatenate([t0, np.zeros((1, t1.shape[1] - t0.shape[1], t1.shape[2]), np.float32)], axis=1)
    pooled_to = pooled_from if pooled_to is None else pooled_to
    pooled = pooled_from
    if pooled_from is not None and pooled_to is not None:
        pooled = pooled_to * w + pooled_from * (1.0 - w)
    return t1 * w + t0 * (1.0 - w), pooled


@pytest.mark.parametrize("to_len, from_len, to_pooled", [(77, 77, True), (154, 77, True), (77, 154, False)])
def test_average_matches_comfyui(to_len, from_len, to_pooled):
    rng = np.random.default_rng(4)
    to, source = _cond(rng, to_len, pooled=to_pooled, options={"strength": 2.0}), _cond(rng, from_len)
    out = ConditioningAverage(to, source, 0.3)
    want, pooled = _comfy_average(np.array(to.cond), None if to.pooled is None else np.array(to.pooled),
                                  np.array(source.cond), np.array(source.pooled), 0.3)
    np.testing.assert_allclose(np.array(out.cond), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(out.pooled), pooled, rtol=1e-6, atol=1e-7)
    assert out.entries[0].options["strength"] == 2.0


def test_zero_out_zeros_tensors_and_keeps_options():
    c = _cond(np.random.default_rng(5), options={"area": (8, 8, 0, 0)})
    out = ConditioningZeroOut(c)
    assert not np.any(np.array(out.cond)) and not np.any(np.array(out.pooled))
    assert out.cond.shape == c.cond.shape and out.entries[0].options["area"] == (8, 8, 0, 0)


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@pytest.mark.slow
def test_area_composition_runs_and_zero_strength_areas_are_plain_txt2img(world):
    shared = [*SMALL, "--set", "seed=3", "--set", "sampler=euler", "--set", "scheduler=normal",
              "--set", "cfg=7.0"]
    composed = run(world, WORKFLOWS / "area_composition.yaml", *shared)
    assert composed.rc == 0, composed.err
    zeroed = run(world, WORKFLOWS / "area_composition.yaml", *shared, "--set", "left.strength=0",
                 "--set", "right.strength=0")
    assert zeroed.rc == 0, zeroed.err
    plain = run(world, WORKFLOWS / "txt2img.yaml", *shared, "--set",
                "prompt=a wide landscape photograph, golden hour, detailed")
    assert plain.rc == 0, plain.err
    images = {p.name: pixels(p) for p in world.pngs()}
    area_images = [images[n] for n in sorted(images) if n.startswith("area_composition")]
    [txt] = [images[n] for n in images if n.startswith("txt2img")]
    assert np.array_equal(area_images[1], txt)  # strength-0 areas add nothing, bit for bit
    assert not np.array_equal(area_images[0], txt)  # real areas change the image


def test_entry_resolvers_turn_recipes_into_one_shared_source():
    """The node-level seam for per-entry extras: a registered resolver turns an option's recipe into what
    sd.sampling evaluates, once per equal recipe across positive and negative."""
    from nodes.sampling import ENTRY_RESOLVERS, register_entry_resolver, sampling_entries

    made = []

    class Source:
        def unet_extras(self, x, timestep, context, areas):
            raise AssertionError("not called here")

    def resolve(recipe, ctx):
        made.append(recipe)
        return Source()

    register_entry_resolver("test_control", resolve)
    try:
        rng = np.random.default_rng(7)
        pos = ConditioningCombine(_cond(rng, options={"test_control": ("cn", 0.5)}),
                                  _cond(rng, options={"test_control": ("cn", 0.8)}))
        neg = _cond(rng, options={"test_control": ("cn", 0.5), "strength": 1.0})
        (p1, p2), (n1,) = sampling_entries(None, pos, neg)
        assert made == [("cn", 0.5), ("cn", 0.8)]
        assert p1[1]["test_control"] is n1[1]["test_control"] is not p2[1]["test_control"]
        assert n1[1]["strength"] == 1.0 and p1[0] is pos.entries[0].cond
    finally:
        ENTRY_RESOLVERS.pop("test_control")
