"""Noise parity with PyTorch's CPU generator (torch is the independent reference here)."""

import numpy as np
import pytest
import torch

from sd.sampling.brownian import BrownianTreeNoiseSampler
from sd.sampling.noise import TorchCPUGenerator, step_noise_sampler, torch_randn

SEEDS = [0, 1, 42, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1]
SHAPES = [(1,), (7,), (15,), (16,), (17,), (33,), (1, 4, 64, 64), (2, 4, 9, 11), (3, 4, 8, 8)]


def reference_randn(seed, shape):
    torch.manual_seed(seed)
    return torch.randn(shape).numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_randn_matches_torch(seed, shape):
    ours = torch_randn(seed, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_allclose(ours, reference_randn(seed, shape), rtol=0, atol=1e-6)


def test_large_latent_batch_matches_torch():
    shape = (4, 4, 128, 128)
    expected = reference_randn(123456789, shape)
    np.testing.assert_allclose(torch_randn(123456789, shape), expected, rtol=0, atol=1e-6)


def test_stream_continues_like_consecutive_torch_calls():
    # Mixes scalar-path sizes (< 16, which cache a second sample) with vectorised ones.
    sizes = [(3,), (20,), (1,), (5,), (2, 4, 3, 3), (1,), (16,), (7,)]
    generator = torch.Generator().manual_seed(987)
    ours = TorchCPUGenerator(987)
    for shape in sizes:
        expected = torch.randn(shape, generator=generator).numpy()
        np.testing.assert_allclose(ours.randn(shape), expected, atol=1e-6)


def test_seed_out_of_range_is_refused():
    with pytest.raises(ValueError):
        TorchCPUGenerator(2**64)


def test_step_noise_sampler_is_comfyui_cpu_default_noise_sampler():
    # ComfyUI on the CPU: torch.Generator seeded with seed + 1, one randn(NCHW) per call.
    seed, nchw = 77, (2, 4, 5, 6)
    sampler = step_noise_sampler((2, 5, 6, 4), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        expected = torch.randn(nchw, generator=generator).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.array(sampler(1.0, 0.5)), expected, atol=1e-6)


def test_brownian_increments_have_brownian_statistics():
    shape = (1, 64, 64, 4)
    sampler = BrownianTreeNoiseSampler(shape, 0.1, 10.0, seed=5)
    a = np.array(sampler(10.0, 4.0))
    b = np.array(sampler(4.0, 1.0))
    whole = np.array(sampler(10.0, 1.0))
    assert abs(a.std() - 1) < 0.03 and abs(b.std() - 1) < 0.03 and abs(whole.std() - 1) < 0.03
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.03  # disjoint intervals: independent
    # Consistency: W(10)-W(1) is the sum of the two pieces.
    np.testing.assert_allclose(whole * 3.0, a * 6.0**0.5 + b * 3.0**0.5, atol=1e-4)
    again = BrownianTreeNoiseSampler(shape, 0.1, 10.0, seed=5)
    np.testing.assert_array_equal(np.array(again(10.0, 4.0)), a)
