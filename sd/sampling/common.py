"""Shared pieces of the samplers: types, the step loop with cancel, and step maths.

Sampler contract (every ``sample_x`` in sd/samplers_*.py):
``sample_x(denoise, x, sigmas, *, callback=None, noise_sampler=None, cancel=None, seed=0, **options) -> x``

* ``denoise(x, sigma) -> denoised`` is the (CFG-combined) x0 prediction at noise level sigma,
* ``x`` is the noisy latent at ``sigmas[0]`` (NHWC, float32), ``sigmas`` a decreasing schedule,
* ``callback(i, x, denoised)`` is called once per step (when given), ``cancel()`` is polled before
  every step and raises :class:`sd.errors.Cancelled` when it returns true,
* ``seed`` seeds the default per-step noise (see sd/sampling/noise.py) when no ``noise_sampler`` is given.

A sampler is pure: it keeps nothing between calls and evaluates nothing itself; when steps are evaluated
is the caller's choice, made in its callback (sd/sampling/ksampler.py pipelines them).

The maths follows k-diffusion's ``sampling.py`` as ComfyUI ships it; step coefficients are
computed in double precision from the float32 sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from sd.errors import Cancelled
from sd.sampling.brownian import BrownianTreeNoiseSampler
from sd.sampling.noise import NoiseSampler, step_noise_sampler

Denoiser = Callable[[mx.array, float], mx.array]
StepCallback = Callable[[int, mx.array, mx.array], None]
CancelCheck = Callable[[], bool]
Sigmas = Sequence[float] | np.ndarray


def sigma_list(sigmas: Sigmas) -> list[float]:
    """Python floats of the float32 schedule (step maths then runs in double precision)."""
    return [float(s) for s in np.asarray(sigmas, dtype=np.float32)]


def step_indices(sigmas: list[float], cancel: CancelCheck | None) -> Iterator[int]:
    """Step indices, checking for cancellation before each step."""
    for i in range(len(sigmas) - 1):
        if cancel is not None and cancel():
            raise Cancelled(f"sampling cancelled before step {i + 1} of {len(sigmas) - 1}")
        yield i


def to_d(x: mx.array, sigma: float, denoised: mx.array) -> mx.array:
    """The probability-flow ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def ancestral_noise(x: mx.array, noise_sampler: NoiseSampler | None, seed: int) -> NoiseSampler:
    """The given noise sampler, else ComfyUI's default one (CPU generator, seed + 1)."""
    return noise_sampler if noise_sampler is not None else step_noise_sampler(x.shape, seed)


def brownian_noise(
    x: mx.array, sigmas: list[float], noise_sampler: NoiseSampler | None, seed: int
) -> NoiseSampler:
    """The given noise sampler, else ComfyUI's Brownian tree over [smallest positive sigma, largest]."""
    if noise_sampler is not None:
        return noise_sampler
    positive = [s for s in sigmas if s > 0]
    return BrownianTreeNoiseSampler(x.shape, min(positive), max(sigmas), seed)


def t_of(sigma: float) -> float:
    """DPM-Solver time: t = -log(sigma) (half log-SNR for eps models in VE form)."""
    return -math.log(sigma)


def sigma_of(t: float) -> float:
    """Inverse of :func:`t_of`."""
    return math.exp(-t)
