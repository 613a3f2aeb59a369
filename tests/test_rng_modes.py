"""Noise sources (sd/sampling/rng.py): which generator each of cpu / cuda / a1111 draws from, in which order.

The generators themselves are checked elsewhere (tests/test_noise.py against torch's CPU randn,
tests/test_philox.py against CUDA values, tests/test_brownian_tree.py against torchsde); here each mode
is checked against a transcription of what ComfyUI or A1111 does with them.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.sampling.brownian import BrownianTreeNoiseSampler
from sd.sampling.ksampler import sample
from sd.sampling.philox import TorchCUDAGenerator, cuda_randn
from sd.sampling.rng import NoiseSource, resolve_rng
from sd.sampling.samplers import get_sampler

SHAPE = (2, 4, 6, 4)  # NHWC: B, h, w, C
NCHW = (2, 4, 4, 6)
SIGMAS = np.array([14.6, 5.0, 1.2, 0.3, 0.0], dtype=np.float32)


def nhwc(a):
    return np.array(a).transpose(0, 2, 3, 1) if not isinstance(a, mx.array) else np.array(a)


def test_cpu_mode_is_comfyui_on_the_cpu():
    source = NoiseSource("cpu", 9, SHAPE)
    expected = torch.randn(NCHW, generator=torch.Generator().manual_seed(9)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.array(source.initial()), expected, atol=1e-6)
    assert source.sampler("euler_ancestral", SIGMAS) is None  # the sampler's own: CPU generator, seed + 1
    assert source.sampler("dpmpp_2m_sde_gpu", SIGMAS) is None  # on the CPU the _gpu tree is a CPU tree


def test_cuda_mode_draws_steps_from_the_cuda_generator_without_the_cpu_offset():
    source = NoiseSource("cuda", 9, SHAPE)
    expected = torch.randn(NCHW, generator=torch.Generator().manual_seed(9)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.array(source.initial()), expected, atol=1e-6)  # prepare_noise: CPU
    steps = source.sampler("euler_ancestral", SIGMAS)
    reference = TorchCUDAGenerator(9)  # default_noise_sampler on CUDA: seed, not seed + 1
    for _ in range(3):
        np.testing.assert_array_equal(np.array(steps(1.0, 0.5)), reference.randn(NCHW).transpose(0, 2, 3, 1))
    assert source.sampler("dpmpp_2m_sde", SIGMAS) is None  # cpu=True tree, as on the CPU
    gpu_tree = source.sampler("dpmpp_2m_sde_gpu", SIGMAS)
    expected_tree = BrownianTreeNoiseSampler(SHAPE, 0.3, 14.6, 9, randn=cuda_randn)
    np.testing.assert_array_equal(np.array(gpu_tree(5.0, 1.2)), np.array(expected_tree(5.0, 1.2)))


def test_a1111_mode_gives_each_image_its_own_cuda_generator():
    source = NoiseSource("a1111", 100, SHAPE)
    first = np.array(source.initial())
    generators = [TorchCUDAGenerator(100), TorchCUDAGenerator(101)]  # seed + batch index
    image = (4, 4, 6)  # C, H, W
    np.testing.assert_array_equal(first, np.stack([g.randn(image) for g in generators]).transpose(0, 2, 3, 1))
    steps = source.sampler("euler_ancestral", SIGMAS)
    for _ in range(2):  # ImageRNG.next(): the same generators continue
        expected = np.stack([g.randn(image) for g in generators]).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(np.array(steps(1.0, 0.5)), expected)
    tree = source.sampler("dpmpp_sde", SIGMAS)  # create_noise_sampler: one tree per image seed, on the GPU
    expected_tree = BrownianTreeNoiseSampler(SHAPE, 0.3, 14.6, [100, 101], randn=cuda_randn)
    np.testing.assert_array_equal(np.array(tree(5.0, 1.2)), np.array(expected_tree(5.0, 1.2)))


def test_a1111_eta_noise_seed_delta_reseeds_the_step_noise():
    source = NoiseSource("a1111", 100, SHAPE, eta_noise_seed_delta=31337)
    plain = NoiseSource("a1111", 100, SHAPE)
    np.testing.assert_array_equal(np.array(source.initial()), np.array(plain.initial()))  # unchanged
    steps = source.sampler("euler_ancestral", SIGMAS)
    expected = np.stack([cuda_randn(100 + i + 31337, (4, 4, 6)) for i in range(2)]).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.array(steps(1.0, 0.5)), expected)


def test_mode_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("SDGRAPH_RNG", raising=False)
    assert resolve_rng(None) == "cpu"
    monkeypatch.setenv("SDGRAPH_RNG", " CUDA ")
    assert resolve_rng(None) == "cuda" and resolve_rng("a1111") == "a1111"
    monkeypatch.setenv("SDGRAPH_RNG", "gpu")
    with pytest.raises(ValueError, match="SDGRAPH_RNG"):
        resolve_rng(None)


def _fake_unet(x, t, context):
    return x * 0.1 + mx.mean(context) * 0.01  # eps prediction; any fixed function will do


@pytest.mark.parametrize("sampler_name", ["euler_ancestral", "dpmpp_2m_sde_gpu"])
def test_ksampler_uses_the_mode_noise(sampler_name):
    latent = mx.zeros((1, 8, 8, 4))
    cond = mx.ones((1, 77, 8))
    run = {
        mode: np.array(
            sample(
                _fake_unet,
                cond,
                cond,
                latent,
                seed=3,
                steps=4,
                cfg=1.0,
                sampler_name=sampler_name,
                scheduler="karras",
                rng=mode,
            )
        )
        for mode in ("cpu", "cuda")
    }
    assert np.abs(run["cpu"] - run["cuda"]).max() > 1e-3
    # The cuda run is the sampler fed CPU initial noise and the CUDA per-step noise, by hand.
    from sd.sampling.ksampler import make_cfg_denoiser, select_sigmas
    from sd.sampling.model_sampling import LATENT_SCALE_FACTOR, SD1_MODEL_SAMPLING

    ms = SD1_MODEL_SAMPLING
    sigmas = select_sigmas(ms, "karras", sampler_name, 4)
    source = NoiseSource("cuda", 3, latent.shape)
    x = ms.noise_scaling(
        float(sigmas[0]), source.initial(), latent, max_denoise=ms.is_max_denoise(float(sigmas[0]))
    )
    denoiser = make_cfg_denoiser(_fake_unet, [cond], [cond], 1.0, ms, latent_shape=latent.shape)
    out = get_sampler(sampler_name)(
        denoiser, x, sigmas, seed=3, noise_sampler=source.sampler(sampler_name, sigmas)
    )
    np.testing.assert_allclose(run["cuda"], np.array(out) / LATENT_SCALE_FACTOR, atol=1e-5)


def test_deterministic_samplers_ignore_the_mode_except_for_a1111_initial_noise():
    latent = mx.zeros((1, 8, 8, 4))
    cond = mx.ones((1, 77, 8))
    run = {
        mode: np.array(
            sample(
                _fake_unet,
                cond,
                cond,
                latent,
                seed=3,
                steps=3,
                cfg=1.0,
                sampler_name="euler",
                scheduler="normal",
                rng=mode,
            )
        )
        for mode in ("cpu", "cuda", "a1111")
    }
    np.testing.assert_array_equal(run["cpu"], run["cuda"])
    assert np.abs(run["cpu"] - run["a1111"]).max() > 1e-2
