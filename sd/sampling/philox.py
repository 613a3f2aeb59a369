"""torch's CUDA ``randn`` (Philox4x32-10 through curand) reproduced in numpy.

What ``torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))`` does for
float32 (ATen ``cuda/DistributionTemplates.h`` ``normal_and_transform`` / ``calc_execution_policy`` /
``distribution_elementwise_grid_stride_kernel``, curand ``curand_philox4x32_x.h`` / ``curand_normal.h``):

* Launch: blocks of 256 threads, ``grid = min(ceil(numel / 256), SMs * (max threads per SM / 256))``;
  ``stride = 256 * grid``. Thread ``idx`` runs ``curand_init(seed, subsequence=idx, offset)`` and, for
  ``k = 0, 1, ...`` while ``idx + 4 * stride * k < numel`` rounded up, draws one ``curand_normal4``
  whose four values go to elements ``idx + 4 * stride * k + stride * j`` (j = 0..3) that exist.
  So tensors up to ``stride`` elements use only the first value of each thread's draw, and the
  grid size, hence the values of large tensors, depends on the GPU's SM count (132 on an H200).
* Counter: ``curand_init`` sets the 128-bit Philox counter to ``(offset / 4) + k`` in its low 64 bits
  and ``idx`` in its high 64 bits; the key is the 64-bit seed. One draw is Philox4x32-10 of that counter.
* ``curand_normal4``: Box-Muller on the word pairs (w0, w1) and (w2, w3):
  ``u = w0 * 2**-32 + 2**-33``, ``v = w1 * (2 pi 2**-32) + pi 2**-32`` (float32, fused multiply-add),
  ``s = sqrt(-2 log u)``, values ``s sin v, s cos v``.
* The generator's offset starts at 0 after ``manual_seed`` and each ``randn`` call advances it by
  ``4 * draws per thread``, so consecutive calls continue the stream.

The one inexact step: the GPU evaluates ``sin``/``cos`` with the fast ``__sincosf`` intrinsic (about
2**-21 absolute error), which no CPU library reproduces bit for bit; we use exact float64 ``sin``/``cos``, so
values agree with the GPU's to a few float32 ulps (checked against recorded GPU values in
tests/test_philox.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

H200_SM_COUNT = 132
MAX_THREADS_PER_SM = 2048  # every NVIDIA GPU since Volta that diffusion runs on, except sm_86/89 (1536)
_BLOCK = 256
_DRAW_VALUES = 4  # curand_normal4
_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_INV_2POW32 = 2.0**-32
_INV_2POW32_2PI = float(np.float32(np.float32(2.3283064e-10) * np.float32(6.2831855)))


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of counters [4, n] (uint32 words x, y, z, w) under a (lo, hi) key: [4, n] uint32."""
    x, y, z, w = (counter[i].astype(np.uint64) for i in range(4))
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0, p1 = _M0 * x, _M1 * z
        x, y, z, w = (
            (p1 >> 32) ^ y ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> 32) ^ w ^ np.uint64(k1),
            p0 & _MASK32,
        )
    return np.stack([x, y, z, w]).astype(np.uint32)


def _fma_f32(a: np.ndarray, b: float, c: float) -> np.ndarray:
    """float32 ``fmaf(a, b, c)``: the product of two float32 values is exact in float64."""
    return (a.astype(np.float32).astype(np.float64) * b + c).astype(np.float32)


def box_muller(w_u: np.ndarray, w_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """curand's ``_curand_box_muller``: (s sin v, s cos v) as float32."""
    u = _fma_f32(w_u, _INV_2POW32, _INV_2POW32 / 2)
    v = _fma_f32(w_v, _INV_2POW32_2PI, float(np.float32(_INV_2POW32_2PI / 2))).astype(np.float64)
    s = np.sqrt(np.float32(-2.0) * np.log(u.astype(np.float64)).astype(np.float32)).astype(np.float64)
    return (s * np.sin(v)).astype(np.float32), (s * np.cos(v)).astype(np.float32)


def launch_stride(
    numel: int, sm_count: int = H200_SM_COUNT, max_threads_per_sm: int = MAX_THREADS_PER_SM
) -> int:
    """Threads in torch's grid-stride launch for ``numel`` values (``calc_execution_policy``)."""
    grid = min(-(-numel // _BLOCK), sm_count * (max_threads_per_sm // _BLOCK))
    return grid * _BLOCK


class TorchCUDAGenerator:
    """``torch.Generator("cuda").manual_seed(seed)``: ``randn`` calls continue the stream as torch's do.

    ``sm_count`` / ``max_threads_per_sm`` are the GPU's (``torch.cuda.get_device_properties``); they only
    matter for tensors larger than ``sm_count * max_threads_per_sm`` values.
    """

    def __init__(
        self, seed: int, sm_count: int = H200_SM_COUNT, max_threads_per_sm: int = MAX_THREADS_PER_SM
    ):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed {seed} is outside 0 .. 2**64-1")
        self.seed = int(seed)
        self.offset = 0  # torch's philox_offset_per_thread
        self.sm_count, self.max_threads_per_sm = int(sm_count), int(max_threads_per_sm)

    def randn(self, shape: Sequence[int] | int) -> np.ndarray:
        """Standard normal float32 values, as the next CUDA ``torch.randn(shape)`` gives them."""
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        numel = math.prod(shape)
        values = self.values_at(numel, np.arange(numel, dtype=np.int64))
        self.offset += self.offset_increment(numel)
        return values.reshape(shape)

    def offset_increment(self, numel: int) -> int:
        """How far one ``randn`` of ``numel`` values advances the generator's offset."""
        if numel == 0:
            return 0
        stride = launch_stride(numel, self.sm_count, self.max_threads_per_sm)
        return ((numel - 1) // (stride * _DRAW_VALUES) + 1) * _DRAW_VALUES

    def values_at(self, numel: int, elements: np.ndarray) -> np.ndarray:
        """Values at flat indices ``elements`` of the next ``randn`` of ``numel`` values (no advance)."""
        elements = np.asarray(elements, dtype=np.int64)
        if elements.size == 0:
            return np.zeros(0, dtype=np.float32)
        stride = launch_stride(numel, self.sm_count, self.max_threads_per_sm)
        k, within = np.divmod(elements, stride * _DRAW_VALUES)
        j, thread = np.divmod(within, stride)
        # Each (thread, k) pair is one Philox call; only the calls some element uses are computed.
        calls, inverse = np.unique(k * stride + thread, return_inverse=True)
        call_k, call_thread = np.divmod(calls.astype(np.uint64), np.uint64(stride))
        low = np.uint64(self.offset // 4) + call_k
        counter = np.stack(
            [low & _MASK32, low >> np.uint64(32), call_thread & _MASK32, call_thread >> np.uint64(32)]
        )
        words = philox4x32_10(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))
        values = np.empty((4, len(calls)), dtype=np.float32)
        values[0], values[1] = box_muller(words[0], words[1])
        if stride < numel:  # only tensors larger than the grid use the draw's later values
            values[2], values[3] = box_muller(words[2], words[3])
        return values[j, inverse]


def cuda_randn(seed: int, shape: Sequence[int] | int) -> np.ndarray:
    """``torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))`` (H200)."""
    return TorchCUDAGenerator(seed).randn(shape)
