"""torch's CUDA randn reproduced in numpy (sd/sampling/philox.py).

References: Random123's published Philox4x32-10 answers; CUDA randn values printed in public code
(flashinfer's docstring, a PyTorch bug report); and, when present, tests/data/philox_reference.npz, recorded
on an NVIDIA GPU by tests/data/make_philox_reference.py (many seeds, sizes across the launch boundaries,
consecutive calls).
"""

from pathlib import Path

import numpy as np
import pytest

from sd.sampling.philox import TorchCUDAGenerator, box_muller, cuda_randn, launch_stride, philox4x32_10

REFERENCE = Path(__file__).parent / "data" / "philox_reference.npz"
# The GPU's __sincosf is an approximation (about 2**-21 absolute) that we evaluate exactly instead.
GPU_ATOL = 2e-5


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123 kat_vectors, philox4x32 10 rounds
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_published_cuda_randn_values():
    # torch.manual_seed(42); torch.randn(2, 5, device="cuda")  (flashinfer logits_processor docstring)
    expected = [[0.1940, 2.1614, -0.1721, 0.8491, -1.9244], [0.6530, -0.6494, -0.8175, 0.5280, -1.2753]]
    np.testing.assert_allclose(cuda_randn(42, (2, 5)), expected, atol=6e-5)


def test_published_consecutive_cuda_randn_calls():
    # Five torch.randn(4, device="cuda") in a row after seeding 42 (tensors printed in a PyTorch bug report):
    # each call moves the Philox offset on by 4.
    expected = [
        [0.1940, 2.1614, -0.1721, 0.8491],
        [0.1391, -0.1082, -0.7174, 0.7566],
        [-0.5187, 1.2268, 0.6255, -0.9117],
        [-0.6974, -1.8688, -0.8832, -1.6627],
        [-1.2682, -0.0383, -0.1029, 1.4400],
    ]
    generator = TorchCUDAGenerator(42)
    for row in expected:
        np.testing.assert_allclose(generator.randn(4), row, atol=6e-5)


def test_launch_grid_follows_the_gpu():
    assert launch_stride(16384) == 16384  # one thread per value below the full grid
    assert launch_stride(16385) == 16384 + 256
    assert launch_stride(10**7) == 132 * 2048  # H200: 132 SMs x 8 blocks of 256
    assert launch_stride(10**7, sm_count=128, max_threads_per_sm=1536) == 128 * 1536  # e.g. an RTX 4090


def test_values_beyond_the_grid_come_from_the_same_draws():
    # Below the grid each value is the first of a thread's four; above, a thread's four values land one
    # grid apart, so element `grid` is the second value (the cos) of thread 0's first draw.
    grid = launch_stride(10**7)
    big, small = cuda_randn(7, grid + 1), cuda_randn(7, grid)
    np.testing.assert_array_equal(big[:grid], small)
    words = philox4x32_10(np.zeros((4, 1), dtype=np.uint32), (7, 0))
    sin_value, cos_value = box_muller(words[0], words[1])
    assert big[0] == sin_value[0] and big[grid] == cos_value[0]


def test_statistics_of_a_latent():
    x = cuda_randn(123, (2, 4, 64, 64))
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
    assert abs(np.corrcoef(x[0].ravel(), x[1].ravel())[0, 1]) < 0.03


def test_seeds_are_64_bit():
    assert np.abs(cuda_randn(5, 64) - cuda_randn(2**32 + 5, 64)).max() > 0.1  # both key words are used
    with pytest.raises(ValueError, match="outside"):
        TorchCUDAGenerator(2**64)


def _reference_cases():
    if not REFERENCE.exists():
        return []
    data = np.load(REFERENCE)
    return [(i, row) for i, row in enumerate(data["cases"])]


@pytest.mark.slow
@pytest.mark.skipif(
    not REFERENCE.exists(),
    reason="tests/data/philox_reference.npz is absent: run tests/data/make_philox_reference.py on a GPU",
)
def test_matches_recorded_cuda_randn():
    data = np.load(REFERENCE)
    sm_count, threads = int(data["sm_count"]), int(data["max_threads_per_sm"])
    worst = 0.0
    for index, row in _reference_cases():
        seed = int(row[0]) | int(row[1]) << 32
        call, ndim = int(row[2]), int(row[3])
        shape = tuple(int(d) for d in row[4 : 4 + ndim])
        numel = int(np.prod(shape))
        generator = TorchCUDAGenerator(seed, sm_count, threads)
        for _ in range(call):
            generator.offset += generator.offset_increment(numel)
        keep = data["first"].shape[1]
        for name, elements in (
            ("first", np.arange(min(keep, numel))),
            ("last", np.arange(max(numel - keep, 0), numel)),
            ("spaced", np.linspace(0, numel - 1, keep).round().astype(np.int64)),
        ):
            ours = generator.values_at(numel, elements)
            theirs = data[name][index][: len(elements)]
            worst = max(worst, float(np.abs(ours - theirs).max()))
            np.testing.assert_allclose(
                ours, theirs, atol=GPU_ATOL, err_msg=f"seed {seed} shape {shape} {name}"
            )
        if numel <= 70_000:  # (full tensors above that are slow to rebuild here)
            values = generator.values_at(numel, np.arange(numel)).astype(np.float64)
            total, squares = data["sums"][index]
            assert abs(values.sum() - total) < 1e-6 * numel + 1e-4, (seed, shape)
            assert abs((values * values).sum() - squares) < 1e-5 * numel, (seed, shape)
    assert worst < GPU_ATOL
