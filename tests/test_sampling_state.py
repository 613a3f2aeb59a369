"""Samplers keep no state: a finished sampling leaves no reference to its arrays in any module, and the
step pipelining (StepPipeline) belongs to the run, so it happens with and without a user callback."""

from __future__ import annotations

import gc
import sys
import weakref

import mlx.core as mx
import pytest

import sd.sampling.ksampler as ksampler
from sd.sampling.ksampler import StepPipeline, sample


def unet(x, t, context):
    return 0.1 * x + mx.mean(context, axis=(1, 2)).reshape(-1, 1, 1, 1)


def _holds_arrays(value, depth: int = 3) -> bool:
    if isinstance(value, mx.array):
        return True
    if depth == 0:
        return False
    if isinstance(value, dict):
        return any(_holds_arrays(v, depth - 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_arrays(v, depth - 1) for v in value)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral", "uni_pc"])
@pytest.mark.parametrize("with_callback", [False, True])
def test_a_finished_sampling_keeps_no_reference_to_its_arrays(monkeypatch, sampler_name, with_callback):
    seen: list[weakref.ref] = []
    hooks: list[type] = []
    real = ksampler.get_sampler(sampler_name)

    def recording_sampler(denoise, x, sigmas, *, callback=None, **kw):
        hooks.append(type(callback))

        def spy(i, x_step, denoised):  # the arrays the sampler hands to its callback
            seen.extend((weakref.ref(x_step), weakref.ref(denoised)))
            callback(i, x_step, denoised)

        return real(denoise, x, sigmas, callback=spy, **kw)

    monkeypatch.setattr(ksampler, "get_sampler", lambda name, model_sampling=None: recording_sampler)
    steps = []
    out = sample(unet, mx.ones((1, 3, 8)), mx.zeros((1, 3, 8)), mx.zeros((1, 4, 4, 4)), seed=1, steps=4,
                 cfg=7.0, sampler_name=sampler_name, scheduler="normal",
                 callback=(lambda i, total, x, d: steps.append(i)) if with_callback else None)
    mx.eval(out)
    del out
    gc.collect()
    assert hooks == [StepPipeline]  # the pipeline is always there, user callback or not
    assert steps == ([0, 1, 2, 3] if with_callback else [])
    assert len(seen) == 8 and all(ref() is None for ref in seen), "a step's array outlived the sampling"
    holders = [f"{name}.{attr}" for name, module in list(sys.modules.items())
               if name.startswith("sd.sampling") and module is not None
               for attr, value in vars(module).items() if _holds_arrays(value)]
    assert not holders, holders


def test_the_pipeline_waits_for_the_previous_step_and_forwards_every_step():
    calls = []
    pipeline = StepPipeline(lambda i, x, d: calls.append((i, x.item(), d.item())))
    for i in range(3):
        x = mx.array(float(i))
        pipeline(i, x, x + 1)
    assert calls == [(0, 0.0, 1.0), (1, 1.0, 2.0), (2, 2.0, 3.0)]
    assert pipeline.previous[0].item() == 2.0  # the run's own state: it goes with the run
