"""Where a run's noise comes from: the three "same seed, same image" conventions sdgraph can follow.

* ``cpu`` (default): ComfyUI sampling on the CPU. Initial noise from torch's CPU generator seeded ``seed``;
  per-step noise from a CPU generator seeded ``seed + 1``; SDE samplers from torchsde's Brownian tree on
  the CPU (sd/sampling/noise.py, sd/sampling/brownian.py). The ``_gpu`` SDE samplers equal the plain ones.
* ``cuda``: ComfyUI on an NVIDIA GPU. Initial noise still from the CPU generator (``prepare_noise`` always
  draws on the CPU); per-step noise from torch's CUDA generator seeded ``seed`` (no + 1 off the CPU,
  ``default_noise_sampler``); SDE samplers keep ComfyUI's CPU tree (``cpu=True``) except the ``_gpu``
  ones, whose tree draws from the CUDA generator (sd/sampling/philox.py).
* ``a1111``: AUTOMATIC1111 / Forge with the default "GPU" seed source (``modules/rng.py``: ``ImageRNG``).
  Image i of the batch has its own CUDA generator seeded ``seed + i``, whose first draw [C, H, W] is its
  initial noise and whose next draws are its per-step noise; with an eta noise seed delta the per-step
  draws come instead from fresh generators seeded ``seed + i + delta``. SDE samplers use one Brownian
  tree per image (seeds ``seed + i``) on the GPU, as A1111's ``create_noise_sampler`` builds them.
  (A1111's samplers and schedules differ from ComfyUI's in places; this covers its noise only.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from sd.sampling.brownian import BrownianTreeNoiseSampler
from sd.sampling.noise import NoiseSampler, torch_randn
from sd.sampling.philox import TorchCUDAGenerator, cuda_randn

RNG_MODES = ("cpu", "cuda", "a1111")
RNG_ENV = "SDGRAPH_RNG"

# ComfyUI's samplers whose noise is BrownianTreeNoiseSampler; the _gpu ones build it on the model's device.
BROWNIAN_SAMPLERS = frozenset(
    {
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu",
        "dpmpp_2m_sde_heun",
        "dpmpp_2m_sde_heun_gpu",
        "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu",
    }
)


def resolve_rng(mode: str | None) -> str:
    """``mode``, or ``$SDGRAPH_RNG`` when it is None/"default", else "cpu"; ValueError for anything else."""
    if mode in (None, "", "default"):
        mode = os.environ.get(RNG_ENV, "").strip().lower() or "cpu"
    if mode not in RNG_MODES:
        raise ValueError(f"unknown noise source {mode!r} (from {RNG_ENV} or noise_device); choose one of "
                         f"{', '.join(RNG_MODES)}")
    return mode


def _to_nhwc(noise_nchw: np.ndarray) -> mx.array:
    return mx.array(np.ascontiguousarray(noise_nchw.transpose(0, 2, 3, 1)))


class NoiseSource:
    """One run's noise: the initial latent noise, then the per-step noise sampler for its sampler.

    Draw :meth:`initial` first: in ``a1111`` mode the per-step noise continues the same generators.
    """

    def __init__(self, mode: str, seed: int, shape_nhwc: Sequence[int], eta_noise_seed_delta: int = 0):
        self.mode = resolve_rng(mode)
        self.seed = int(seed)
        b, h, w, c = (int(s) for s in shape_nhwc)
        self.shape_nhwc, self.batch, self.image_shape = (b, h, w, c), b, (c, h, w)
        self.delta = int(eta_noise_seed_delta)
        self._image_generators: list[TorchCUDAGenerator] | None = None

    def _image_seeds(self) -> list[int]:
        return [(self.seed + i) % 2**64 for i in range(self.batch)]

    def initial(self) -> mx.array:
        """The initial latent noise, unscaled NHWC."""
        if self.mode != "a1111":
            b, h, w, c = self.shape_nhwc
            return _to_nhwc(torch_randn(self.seed, (b, c, h, w)))
        self._image_generators = [TorchCUDAGenerator(s) for s in self._image_seeds()]
        return _to_nhwc(np.stack([g.randn(self.image_shape) for g in self._image_generators]))

    def sampler(self, sampler_name: str, sigmas: Sequence[float]) -> NoiseSampler | None:
        """The per-step noise for ``sampler_name`` over ``sigmas``; None means the sampler's default (cpu)."""
        if sampler_name in BROWNIAN_SAMPLERS:
            return self._brownian(sampler_name, sigmas)
        if self.mode == "cpu":
            return None
        if self.mode == "cuda":
            generator = TorchCUDAGenerator(self.seed)
            b, h, w, c = self.shape_nhwc
            return lambda sigma, sigma_next: _to_nhwc(generator.randn((b, c, h, w)))
        if self.delta or self._image_generators is None:
            generators = [TorchCUDAGenerator((s + self.delta) % 2**64) for s in self._image_seeds()]
        else:
            generators = self._image_generators
        return lambda sigma, sigma_next: _to_nhwc(np.stack([g.randn(self.image_shape) for g in generators]))

    def _brownian(self, sampler_name: str, sigmas: Sequence[float]) -> NoiseSampler | None:
        positive = [float(s) for s in np.asarray(sigmas, dtype=np.float32) if s > 0]
        if not positive:
            return None
        lo, hi = min(positive), float(np.max(np.asarray(sigmas, dtype=np.float32)))
        if self.mode == "a1111":
            return BrownianTreeNoiseSampler(self.shape_nhwc, lo, hi, self._image_seeds(), randn=cuda_randn)
        if self.mode == "cuda" and sampler_name.endswith("_gpu"):
            return BrownianTreeNoiseSampler(self.shape_nhwc, lo, hi, self.seed, randn=cuda_randn)
        return None  # ComfyUI's cpu=True tree: the sampler's default
