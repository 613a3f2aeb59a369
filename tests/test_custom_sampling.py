"""Custom sampling: SamplerCustomAdvanced / SamplerCustom built from the pieces a KSampler spells out give
that KSampler's latents bit for bit; the schedule and sigma nodes equal a torch transcription of ComfyUI's
(comfy_extras/nodes_custom_sampler.py, k-diffusion's get_sigmas_*, nodes_align_your_steps.py); the new
socket values survive the disk store."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from sd_nodes_testing import make_world

from graph.types import SOCKET_TYPES
from nodes.conditioning import CLIPEncode
from nodes.custom_sampling import (
    AlignYourStepsScheduler,
    BasicScheduler,
    CFGGuider,
    DisableNoise,
    ExponentialScheduler,
    FlipSigmas,
    KarrasScheduler,
    KSamplerSelect,
    PolyexponentialScheduler,
    RandomNoise,
    SamplerCustom,
    SamplerCustomAdvanced,
    SDTurboScheduler,
    SplitSigmas,
    SplitSigmasDenoise,
)
from nodes.sampling import KSampler, KSamplerAdvanced
from nodes.sampling_values import NoiseRecipe, SamplerRecipe
from nodes.values import ClipRecipe, FileRef, Latent, ModelRecipe
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING as MS


class Ctx:
    def log(self, msg: str) -> None:
        pass

    def progress(self, step: int, total: int) -> None:
        pass

    def is_cancelled(self) -> bool:
        return False


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    world = make_world(tmp_path_factory, tmp_path_factory.mktemp("custom"))
    ref = FileRef.of(world.checkpoint)
    model, clip, ctx = ModelRecipe(ref), ClipRecipe(ref), Ctx()
    positive = CLIPEncode(clip, "a lighthouse at dawn", ctx=ctx)
    negative = CLIPEncode(clip, "blurry", ctx=ctx)
    rng = np.random.default_rng(0)
    start = Latent(mx.array(rng.standard_normal((2, 6, 8, 4)).astype(np.float32)))
    return model, positive, negative, start, ctx


CASES = [("euler", "normal", 1.0), ("dpmpp_2m_sde", "karras", 1.0), ("euler_ancestral", "simple", 0.6),
         ("lms", "exponential", 1.0), ("heun", "sgm_uniform", 0.8)]


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name, scheduler, denoise", CASES)
def test_custom_advanced_equals_ksampler_bit_for_bit(pieces, sampler_name, scheduler, denoise):
    model, positive, negative, start, ctx = pieces
    seed, steps, cfg = 7, 3, 6.5
    want = KSampler(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                    positive=positive, negative=negative, latent_image=start, denoise=denoise, ctx=ctx)
    sigmas = BasicScheduler(model, scheduler, steps, denoise)
    sampler = KSamplerSelect(sampler_name)
    guider = CFGGuider(model, positive, negative, cfg)
    out, denoised = SamplerCustomAdvanced(RandomNoise(seed), guider, sampler, sigmas, start, ctx=ctx)
    assert np.array_equal(np.array(out.samples), np.array(want.samples))
    assert denoised.samples.shape == out.samples.shape and not np.array_equal(np.array(denoised.samples),
                                                                              np.array(start.samples))
    custom, _ = SamplerCustom(model, True, seed, cfg, positive=positive, negative=negative, sampler=sampler,
                              sigmas=sigmas, latent_image=start, ctx=ctx)
    assert np.array_equal(np.array(custom.samples), np.array(want.samples))


@pytest.mark.slow
def test_split_sigmas_and_disabled_noise_equal_ksampler_advanced(pieces):
    """KSamplerAdvanced over steps 1..3 of 4 without added noise and with leftover noise is the schedule
    split twice and DisableNoise."""
    model, positive, negative, start, ctx = pieces
    want = KSamplerAdvanced(model, add_noise="disable", noise_seed=3, steps=4, cfg=5.0, sampler_name="euler",
                            scheduler="normal", positive=positive, negative=negative, latent_image=start,
                            start_at_step=1, end_at_step=3, return_with_leftover_noise="enable", ctx=ctx)
    high, _ = SplitSigmas(BasicScheduler(model, "normal", 4, 1.0), 3)
    _, middle = SplitSigmas(high, 1)
    out, _ = SamplerCustomAdvanced(DisableNoise(), CFGGuider(model, positive, negative, 5.0),
                                   KSamplerSelect("euler"), middle, start, ctx=ctx)
    assert np.array_equal(np.array(out.samples), np.array(want.samples))


def test_empty_sigmas_return_the_latent(pieces):
    model, positive, negative, start, ctx = pieces
    empty = BasicScheduler(model, "normal", 4, 0.0)
    out, denoised = SamplerCustomAdvanced(RandomNoise(1), CFGGuider(model, positive, negative, 5.0),
                                          KSamplerSelect("euler"), empty, start, ctx=ctx)
    assert out is start and denoised is start


# --- schedules: a torch transcription of ComfyUI / k-diffusion ---

def k_karras(n, sigma_min, sigma_max, rho):
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** rho, torch.zeros(1)])


def k_exponential(n, sigma_min, sigma_max):
    return torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp(), torch.zeros(1)])


def k_polyexponential(n, sigma_min, sigma_max, rho):
    ramp = torch.linspace(1, 0, n) ** rho
    return torch.cat([torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)),
                      torch.zeros(1)])


def comfy_sd_turbo(steps, denoise):
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start : start + steps]
    log_sigmas = torch.tensor(MS.log_sigmas)
    t = timesteps.float().clamp(0, 999)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return torch.cat([((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp(), torch.zeros(1)])


def comfy_ays(steps, denoise):
    levels = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
              0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
    total = steps
    if denoise < 1.0:
        total = round(steps * denoise)
    sigmas = levels[:]
    if steps + 1 != len(sigmas):
        xs = np.linspace(0, 1, len(sigmas))
        sigmas = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, np.log(sigmas[::-1])))[::-1].copy()
    sigmas = sigmas[-(total + 1):]
    sigmas[-1] = 0
    return torch.FloatTensor(sigmas)


def _close(ours, theirs, rtol=1e-6):
    np.testing.assert_allclose(np.array(ours), theirs.numpy(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_schedules_match_comfyui(steps):
    _close(KarrasScheduler(steps, 14.614642, 0.0291675, 7.0), k_karras(steps, 0.0291675, 14.614642, 7.0))
    _close(KarrasScheduler(steps, 3.0, 0.5, 4.5), k_karras(steps, 0.5, 3.0, 4.5))
    _close(ExponentialScheduler(steps, 14.614642, 0.0291675), k_exponential(steps, 0.0291675, 14.614642))
    _close(PolyexponentialScheduler(steps, 10.0, 0.1, 2.0), k_polyexponential(steps, 0.1, 10.0, 2.0))
    _close(AlignYourStepsScheduler("SD1", steps, 1.0), comfy_ays(steps, 1.0))
    _close(AlignYourStepsScheduler("SD1", steps, 0.5), comfy_ays(steps, 0.5))


@pytest.mark.parametrize("steps, denoise", [(1, 1.0), (4, 1.0), (2, 0.5), (10, 1.0)])
def test_sd_turbo_matches_comfyui(pieces, steps, denoise):
    _close(SDTurboScheduler(pieces[0], steps, denoise), comfy_sd_turbo(steps, denoise))


def test_split_and_flip_follow_comfyui():
    s = mx.array(np.array([10.0, 5.0, 2.0, 1.0, 0.0], np.float32))
    high, low = SplitSigmas(s, 2)
    assert np.array(high).tolist() == [10.0, 5.0, 2.0] and np.array(low).tolist() == [2.0, 1.0, 0.0]
    high, low = SplitSigmasDenoise(s, 0.5)
    assert np.array(high).tolist() == [10.0, 5.0, 2.0] and np.array(low).tolist() == [2.0, 1.0, 0.0]
    high, low = SplitSigmasDenoise(s, 0.0)  # ComfyUI's sigmas[:-0]: empty
    assert np.array(high).tolist() == [] and np.array(low).tolist() == [0.0]
    flipped = np.array(FlipSigmas(s)).tolist()
    assert flipped[0] == pytest.approx(0.0001) and flipped[1:] == [1.0, 2.0, 5.0, 10.0]


def test_custom_sampling_values_round_trip():
    for type_name, value in [("SAMPLER", SamplerRecipe("dpmpp_2m")), ("NOISE", NoiseRecipe(2**63 + 5)),
                             ("NOISE", NoiseRecipe(0, random=False))]:
        st = SOCKET_TYPES[type_name]
        assert st.from_bytes(st.to_bytes(value)) == value
    sigmas = KarrasScheduler(5, 14.6, 0.03, 7.0)
    back = SOCKET_TYPES["SIGMAS"].from_bytes(SOCKET_TYPES["SIGMAS"].to_bytes(sigmas))
    assert np.array_equal(np.array(back), np.array(sigmas)) and back.dtype == mx.float32
    assert not SOCKET_TYPES["GUIDER"].serializable  # it holds a MODEL recipe: memory only


@pytest.mark.slow
def test_custom_sampling_workflow_is_txt2img_pixel_for_pixel(tmp_path_factory, tmp_path):
    from sd_nodes_testing import SMALL, WORKFLOWS, pixels, run

    world = make_world(tmp_path_factory, tmp_path)
    shared = [*SMALL, "--set", "seed=9", "--set", "sampler=dpmpp_2m", "--set", "scheduler=karras"]
    assert run(world, WORKFLOWS / "custom_sampling.yaml", *shared).rc == 0
    assert run(world, WORKFLOWS / "txt2img.yaml", *shared).rc == 0
    rescaled = run(world, WORKFLOWS / "custom_sampling.yaml", *shared, "--set", "rescale=0.7")
    assert rescaled.rc == 0, rescaled.err
    images = {p.name: pixels(p) for p in world.pngs()}
    assert np.array_equal(images["custom_sampling_00001_.png"], images["txt2img_00001_.png"])
    assert not np.array_equal(images["custom_sampling_00002_.png"], images["txt2img_00001_.png"])


@pytest.mark.slow
def test_comfyui_api_workflow_with_custom_sampling_and_areas_runs(tmp_path_factory, tmp_path):
    """A ComfyUI API-format file using these nodes (links by output index: SplitSigmas' low_sigmas is 1)."""
    import json

    from sd_nodes_testing import run

    world = make_world(tmp_path_factory, tmp_path)
    def n(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    api = {
        "1": n("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors"),
        "2": n("CLIPTextEncode", clip=["1", 1], text="a castle"),
        "3": n("CLIPTextEncode", clip=["1", 1], text="a dragon"),
        "4": n("ConditioningSetArea", conditioning=["3", 0], width=64, height=64, x=0, y=0, strength=1.2),
        "5": n("ConditioningCombine", conditioning_1=["2", 0], conditioning_2=["4", 0]),
        "6": n("ConditioningZeroOut", conditioning=["2", 0]),
        "7": n("EmptyLatentImage", width=96, height=64, batch_size=1),
        "8": n("BasicScheduler", model=["1", 0], scheduler="karras", steps=3, denoise=1.0),
        "9": n("SplitSigmas", sigmas=["8", 0], step=1),
        "10": n("CFGGuider", model=["1", 0], positive=["5", 0], negative=["6", 0], cfg=6.0),
        "11": n("KSamplerSelect", sampler_name="euler_ancestral"),
        "12": n("RandomNoise", noise_seed=4),
        "13": n("SamplerCustomAdvanced", noise=["12", 0], guider=["10", 0], sampler=["11", 0],
                sigmas=["9", 0],
                latent_image=["7", 0]),
        "14": n("DisableNoise"),
        "15": n("SamplerCustomAdvanced", noise=["14", 0], guider=["10", 0], sampler=["11", 0],
                sigmas=["9", 1],
                latent_image=["13", 0]),
        "16": n("VAEDecode", samples=["15", 1], vae=["1", 2]),
        "17": n("SaveImage", images=["16", 0], filename_prefix="api"),
    }
    path = tmp_path / "api.json"
    path.write_text(json.dumps(api))
    result = run(world, path)
    assert result.rc == 0, result.err
    assert [p.name for p in world.pngs()] == ["api_00001_.png"]
