"""sd/sampling/brownian.py against torchsde 0.2.6 and a torch transcription of ComfyUI's noise sampler.

Our CPU randn agrees with torch's to 1 float32 ulp (torch's vectorised log/sin/cos are not correctly
rounded), so the tree values agree to a few ulps; a wrong seed, split or bridge gives O(1) differences.
"""

import math
import warnings

import numpy as np
import pytest
import torch

torchsde = pytest.importorskip("torchsde")

from sd.sampling.brownian import BrownianTree, BrownianTreeNoiseSampler  # noqa: E402
from sd.sampling.philox import cuda_randn  # noqa: E402


def _f32(value):
    return float(np.float32(value))


def _torchsde_tree(shape, t0, t1, seed):
    return torchsde.BrownianTree(torch.tensor(t0), torch.zeros(shape), torch.tensor(t1), entropy=seed)


def _assert_close(ours, theirs, scale):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4e-7 * max(1.0, scale) * 4)


CASES = [  # (seed, t0, t1, shape)
    (0, 0.0291675, 14.614642, (1, 4, 8, 8)),  # SD1.5's sigma range
    (1, 0.0291675, 14.614642, (2, 4, 3, 5)),  # numel not a multiple of 16 (torch's tail block)
    (2**32 + 5, 0.1, 3.0, (3, 5)),  # fewer than 16 values: torch's scalar path; seeds above 32 bits
    (2**64 - 1, 0.0291675, 14.614642, (1, 4, 4, 4)),
    (123456789, 0.002, 120.0, (1, 4, 4, 4)),  # SDXL-like range
]


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "t0", "t1", "shape"), CASES)
def test_tree_matches_torchsde_on_sampler_like_queries(seed, t0, t1, shape):
    t0, t1 = _f32(t0), _f32(t1)
    rng = np.random.default_rng(seed % 2**32)
    points = sorted({_f32(t) for t in rng.uniform(t0, t1, 14)} | {t0, t1}, reverse=True)
    theirs_tree, ours_tree = _torchsde_tree(shape, t0, t1, seed), BrownianTree(shape, t0, t1, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde warns when a query is clamped to [t0, t1]
        for hi, lo in zip(points[:-1], points[1:], strict=True):
            mid = _f32(math.exp(0.5 * (math.log(hi) + math.log(lo))))  # dpmpp_sde's midpoint queries
            for a, b in ((lo, hi), (mid, hi), (lo, mid)):
                theirs = theirs_tree(torch.tensor(a), torch.tensor(b)).numpy()
                _assert_close(ours_tree(a, b), theirs, math.sqrt(b - a))


@pytest.mark.slow
def test_tree_matches_torchsde_on_random_overlapping_queries():
    rng = np.random.default_rng(11)
    for seed in rng.integers(0, 2**63, 12):
        t0, t1 = _f32(rng.uniform(0.01, 0.2)), _f32(rng.uniform(1, 20))
        shape = (1, 4, 2, 3)
        theirs_tree = _torchsde_tree(shape, t0, t1, int(seed))
        ours_tree = BrownianTree(shape, t0, t1, int(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(20):  # any order, any overlap: the tree is a function of the entropy alone
                a, b = sorted(_f32(t) for t in rng.uniform(t0 - 0.01, t1 + 0.5, 2))
                theirs = theirs_tree(torch.tensor(a), torch.tensor(b)).numpy()
                _assert_close(ours_tree(a, b), theirs, math.sqrt(t1 - t0))


def test_tree_is_a_function_of_the_entropy_alone():
    shape = (1, 4, 2, 2)
    one, other = BrownianTree(shape, 0.03, 14.6, 5), BrownianTree(shape, 0.03, 14.6, 5)
    first = one(1.0, 2.0)
    one(0.5, 7.0), one(0.03, 14.6)
    np.testing.assert_array_equal(other(0.5, 7.0), one(0.5, 7.0))
    np.testing.assert_array_equal(one(1.0, 2.0), first)
    np.testing.assert_allclose(one(1.0, 1.5) + one(1.5, 2.0), first, atol=1e-6)  # increments add up
    assert np.abs(BrownianTree(shape, 0.03, 14.6, 6)(1.0, 2.0) - first).max() > 1e-2


class _ComfyBatchedBrownianTree:
    """ComfyUI's BatchedBrownianTree (comfy/k_diffusion/sampling.py), transcribed, cpu=True."""

    def __init__(self, x, t0, t1, seed):
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = torch.zeros_like(x)
        self.batched = isinstance(seed, (tuple, list))
        if self.batched:
            w0 = w0[0]
        else:
            seed = (seed,)
        self.trees = tuple(torchsde.BrownianTree(t0.cpu(), w0.cpu(), t1.cpu(), entropy=s) for s in seed)

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        w = torch.stack([tree(t0.cpu().float(), t1.cpu().float()) for tree in self.trees])
        w = w * (self.sign * sign)
        return w if self.batched else w[0]


class _ComfyBrownianTreeNoiseSampler:
    def __init__(self, x, sigma_min, sigma_max, seed):
        self.tree = _ComfyBatchedBrownianTree(x, torch.as_tensor(sigma_min), torch.as_tensor(sigma_max), seed)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


@pytest.mark.parametrize("seed", [42, [42, 43]])
def test_noise_sampler_matches_comfyui(seed):
    sigmas = torch.tensor([14.614642, 6.2, 2.5, 0.9, 0.3, 0.0291675])
    x = torch.zeros((2, 4, 3, 5))
    theirs = _ComfyBrownianTreeNoiseSampler(x, sigmas[-1], sigmas[0], seed)
    ours = BrownianTreeNoiseSampler((2, 3, 5, 4), float(sigmas[-1]), float(sigmas[0]), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            expected = theirs(s, s_next).numpy().transpose(0, 2, 3, 1)
            got = np.array(ours(float(s), float(s_next)))
            np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)
            assert abs(got.std() - 1) < 0.5


def test_per_item_trees_are_separate_trees():
    batched = BrownianTreeNoiseSampler((2, 2, 2, 4), 0.03, 14.6, [5, 9])
    single = BrownianTreeNoiseSampler((1, 2, 2, 4), 0.03, 14.6, 9)
    np.testing.assert_array_equal(np.array(batched(3.0, 1.0))[1:], np.array(single(3.0, 1.0)))
    with pytest.raises(ValueError, match="seeds for a batch"):
        BrownianTreeNoiseSampler((2, 2, 2, 4), 0.03, 14.6, [5])


def test_gpu_tree_draws_from_the_cuda_generator():
    cpu_tree = BrownianTree((1, 4, 4, 4), 0.03, 14.6, 3)
    gpu_tree = BrownianTree((1, 4, 4, 4), 0.03, 14.6, 3, randn=cuda_randn)
    root_seed = int(np.random.SeedSequence(entropy=3, pool_size=24).generate_state(3)[0])
    expected = cuda_randn(root_seed, (1, 4, 4, 4)) * np.float32(math.sqrt(_f32(14.6) - _f32(0.03)))
    np.testing.assert_allclose(gpu_tree(0.03, 14.6), expected, rtol=1e-6)
    assert np.abs(gpu_tree(1.0, 2.0) - cpu_tree(1.0, 2.0)).max() > 1e-2
