"""Noise that matches PyTorch's CPU generator, and the per-step noise samplers.

ComfyUI draws its initial latent noise with ``torch.manual_seed(seed); torch.randn(shape)`` on
the CPU (``comfy/sample.py: prepare_noise``), whatever device the model runs on. Reproducing
that stream is what makes "same seed -> same image" hold between ComfyUI and sdgraph.

How PyTorch's CPU ``randn`` works for float32 (ATen ``CPUGeneratorImpl``, ``normal_kernel``):

* The engine is a standard MT19937. ``manual_seed`` accepts any 64-bit seed but the engine is
  seeded with ``seed & 0xFFFFFFFF`` (Knuth's ``init_genrand``), so seeds 5 and 2**32 + 5 give the
  same numbers. numpy's ``MT19937`` bit generator is the same engine; we seed its key ourselves
  and use it only to produce the raw 32-bit words.
* ``numel >= 16``: fill the tensor with float uniforms ``(word & 0xFFFFFF) / 2**24``, then apply
  Box-Muller to each block of 16 (values j and j+8 of a block share one pair of uniforms:
  ``r = sqrt(-2 log(1 - u[j]))``, ``theta = float32(2 pi) * u[j+8]`` in float32,
  ``out[j] = r cos``, ``out[j+8] = r sin``).
  If numel is not a multiple of 16, 16 fresh uniforms overwrite the last 16 slots and that
  final block is transformed again.
  torch evaluates log/cos/sin with its vectorised (SLEEF) routines, which are not correctly rounded,
  so an occasional value differs from ours (exact float64 maths) by one float32 ulp.
* ``numel < 16``: a scalar path in double precision, one value per call of
  ``normal_distribution<double>``: two 53-bit uniforms (each built from two 32-bit words,
  high word first), ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``; returns ``r cos`` and
  caches ``r sin`` in the generator for the next scalar draw. The cache survives across calls
  (only ``manual_seed`` clears it) and the vectorised path neither reads nor clears it.

Per-step noise of ancestral/SDE samplers (what ComfyUI does, and what we do):

* ``euler_ancestral``, ``dpm_2_ancestral``, ``dpmpp_2s_ancestral``, ``lcm`` use
  ``default_noise_sampler``: a fresh ``torch.Generator`` seeded with the sampling seed, and on
  the CPU with ``seed + 1`` (current ComfyUI adds 1 on the CPU only; older releases used ``seed``
  and its per-step noise then equals the initial noise), then one ``torch.randn(x.shape)`` (NCHW)
  per call (for seed 2**64 - 1 we wrap seed + 1 to 0). We reproduce this exactly
  with :func:`step_noise_sampler`, i.e. ComfyUI's behaviour when it samples on the CPU. On a GPU
  ComfyUI draws this noise from the CUDA/MPS generator (seed without the + 1).
* ``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde`` use ``BrownianTreeNoiseSampler``, built on
  torchsde's ``BrownianTree``, whose seeding (numpy ``SeedSequence`` splits, one torch generator per
  tree node) sd/sampling/brownian.py reproduces, so these samplers give ComfyUI's numbers too.
* On an NVIDIA GPU ComfyUI's per-step noise comes from torch's CUDA generator (Philox), reproduced in
  sd/sampling/philox.py; sd/sampling/rng.py picks the source per run (``cpu``, ``cuda``, ``a1111``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

_MT_STATE_WORDS = 624
_UNIFORM_24_BITS = 0xFFFFFF
_UNIFORM_53_BITS = (1 << 53) - 1
_BLOCK = 16  # torch's vectorised normal kernel works on blocks of 16 values


def _mt19937_key(seed: int) -> np.ndarray:
    """The MT19937 state after ``init_genrand(seed & 0xFFFFFFFF)``, as torch seeds it."""
    key = np.empty(_MT_STATE_WORDS, dtype=np.uint32)
    previous = int(seed) & 0xFFFFFFFF
    key[0] = previous
    for j in range(1, _MT_STATE_WORDS):
        previous = (1812433253 * (previous ^ (previous >> 30)) + j) & 0xFFFFFFFF
        key[j] = previous
    return key


def _box_muller_blocks(uniform: np.ndarray) -> np.ndarray:
    """torch's ``normal_fill_16`` on consecutive blocks of 16 float32 uniforms."""
    blocks = uniform.reshape(-1, 2, _BLOCK // 2)
    u1 = (np.float32(1.0) - blocks[:, 0]).astype(np.float64)  # 1 - u keeps log() finite
    radius = np.sqrt(-2.0 * np.log(u1)).astype(np.float32).astype(np.float64)
    # torch's (AVX2) kernel forms theta in float32 as float(2 pi) * u; near theta = pi the
    # rounding shows at 1e-6, so do the same.
    theta = (np.float32(2.0 * math.pi) * blocks[:, 1]).astype(np.float64)
    out = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    return out.astype(np.float32).reshape(-1)


class TorchCPUGenerator:
    """A generator whose ``randn`` calls continue the stream like torch's seeded CPU generator."""

    def __init__(self, seed: int):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed {seed} is outside 0 .. 2**64-1")
        self._engine = np.random.MT19937(0)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchCPUGenerator:
        """Restart the stream from ``seed``, as ``torch.Generator.manual_seed`` does (cheaper than anew)."""
        self.seed = int(seed)
        if hasattr(self._engine, "_legacy_seeding"):  # numpy's own init_genrand: the same key, in C
            self._engine._legacy_seeding(self.seed & 0xFFFFFFFF)
        else:
            self._engine.state = {
                "bit_generator": "MT19937",
                "state": {"key": _mt19937_key(self.seed), "pos": _MT_STATE_WORDS},
            }
        self._cached_normal: float | None = None
        return self

    def _words(self, count: int) -> np.ndarray:
        return self._engine.random_raw(count).astype(np.uint64)

    def _uniform_float(self, count: int) -> np.ndarray:
        return ((self._words(count) & _UNIFORM_24_BITS).astype(np.float64) / 2**24).astype(np.float32)

    def _uniform_double(self) -> float:
        high, low = (int(w) for w in self._words(2))
        return ((high << 32 | low) & _UNIFORM_53_BITS) / 2**53

    def _scalar_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform_double()
        u2 = self._uniform_double()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: Sequence[int] | int) -> np.ndarray:
        """Standard normal float32 values, as the next ``torch.randn(shape)`` would give."""
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        size = math.prod(shape)
        if size < _BLOCK:
            values = np.array([self._scalar_normal() for _ in range(size)], dtype=np.float64)
            return values.astype(np.float32).reshape(shape)
        data = self._uniform_float(size)
        full = size - size % _BLOCK
        data[:full] = _box_muller_blocks(data[:full])
        if full != size:
            data[size - _BLOCK :] = _box_muller_blocks(self._uniform_float(_BLOCK))
        return data.reshape(shape)


def torch_randn(seed: int, shape: Sequence[int] | int) -> np.ndarray:
    """``torch.manual_seed(seed); torch.randn(shape)`` on the CPU, float32, without torch."""
    return TorchCPUGenerator(seed).randn(shape)


NoiseSampler = Callable[[float, float], mx.array]


def _nhwc_to_nchw_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    b, h, w, c = shape
    return (b, c, h, w)


def _nchw_to_nhwc(noise: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(noise.transpose(0, 2, 3, 1)))


def step_noise_sampler(shape_nhwc: Sequence[int], seed: int) -> NoiseSampler:
    """ComfyUI's ``default_noise_sampler`` on the CPU: generator seeded ``seed + 1``, one randn per call.

    Noise is drawn in ComfyUI's NCHW layout (so the numbers land where ComfyUI puts them) and
    returned NHWC.
    """
    generator = TorchCPUGenerator((int(seed) + 1) % 2**64)
    nchw = _nhwc_to_nchw_shape(shape_nhwc)

    def sample(sigma: float, sigma_next: float) -> mx.array:
        return _nchw_to_nhwc(generator.randn(nchw))

    return sample
