"""Sigma schedules with ComfyUI's names and values (``comfy/samplers.py: calculate_sigmas``).

Every schedule returns a float32 numpy array of ``steps + 1`` decreasing sigmas ending in 0
(``ddim_uniform`` and ``beta`` may return fewer when table indices collide, as ComfyUI's do).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from sd.sampling.model_sampling import ModelSamplingDiscrete

SCHEDULERS = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
    "linear_quadratic", "kl_optimal",
)

# ComfyUI computes one extra step for these samplers and then drops the second-to-last sigma.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(sigmas, dtype=np.float32), np.zeros(1, np.float32)])


def karras(ms: ModelSamplingDiscrete, steps: int, rho: float = 7.0) -> np.ndarray:
    return karras_sigmas(steps, ms.sigma_min, ms.sigma_max, rho)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): uniform in sigma^(1/rho) between sigma_max and sigma_min."""
    ramp = np.linspace(0.0, 1.0, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(ms: ModelSamplingDiscrete, steps: int) -> np.ndarray:
    return exponential_sigmas(steps, ms.sigma_min, ms.sigma_max)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log-sigma between sigma_max and sigma_min."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)))


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """k-diffusion's polyexponential: log-sigma falls along ramp^rho (rho 1 = exponential)."""
    ramp = np.linspace(1.0, 0.0, steps) ** rho
    return _append_zero(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sd_turbo_sigmas(ms: ModelSamplingDiscrete, steps: int, denoise: float = 1.0) -> np.ndarray:
    """ComfyUI's SDTurboScheduler: timesteps 999, 899, ..., 99, from 10 - int(10 * denoise) on."""
    start = 10 - int(10 * denoise)
    timesteps = (np.arange(1, 11) * 100 - 1)[::-1][start : start + steps]
    return _append_zero(ms.sigma(timesteps.astype(np.float32)))


# Align Your Steps (Sabour et al. 2024): NVIDIA's optimised 10-step noise levels, as ComfyUI ships them.
AYS_NOISE_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def align_your_steps_sigmas(model_type: str, steps: int, denoise: float = 1.0) -> np.ndarray:
    """ComfyUI's AlignYourStepsScheduler: the levels log-linearly resampled to steps + 1, the tail kept for
    denoise < 1 (round(steps * denoise) steps), the last set to 0."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return np.zeros(0, np.float32)
        total = round(steps * denoise)
    levels = np.array(AYS_NOISE_LEVELS[model_type], dtype=np.float64)
    if steps + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, np.log(levels[::-1])))[::-1].copy()
    levels = levels[-(total + 1) :]
    levels[-1] = 0
    return levels.astype(np.float32)


def normal(ms: ModelSamplingDiscrete, steps: int, sgm: bool = False) -> np.ndarray:
    """Uniform in timestep from the table's last to first entry, mapped back through ``ms.sigma``."""
    start = float(ms.timestep(ms.sigma_max))
    end = float(ms.timestep(ms.sigma_min))
    append_zero = True
    if sgm:
        timesteps = np.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0.0, abs_tol=1e-5):  # zero-SNR tables end at 0
            steps += 1
            append_zero = False
        timesteps = np.linspace(start, end, steps)
    sigmas = ms.sigma(timesteps.astype(np.float32))
    return _append_zero(sigmas) if append_zero else sigmas.astype(np.float32)


def sgm_uniform(ms: ModelSamplingDiscrete, steps: int) -> np.ndarray:
    return normal(ms, steps, sgm=True)


def simple(ms: ModelSamplingDiscrete, steps: int) -> np.ndarray:
    """Table entries taken at even strides from the top."""
    stride = len(ms.sigmas) / steps
    return _append_zero([ms.sigmas[-(1 + int(i * stride))] for i in range(steps)])


def ddim_uniform(ms: ModelSamplingDiscrete, steps: int) -> np.ndarray:
    """Every ``len // steps``-th table entry starting at index 1, as the DDIM sampler picks them."""
    index = 1
    if math.isclose(float(ms.sigmas[index]), 0.0, abs_tol=1e-5):
        steps += 1
        picked: list[float] = []
    else:
        picked = [0.0]
    stride = max(len(ms.sigmas) // steps, 1)
    while index < len(ms.sigmas):
        picked.append(float(ms.sigmas[index]))
        index += stride
    return np.asarray(picked[::-1], dtype=np.float32)


def beta(ms: ModelSamplingDiscrete, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> np.ndarray:
    """Timesteps at quantiles of Beta(alpha, beta) (Lee et al. 2024); repeated indices dropped."""
    total_timesteps = len(ms.sigmas) - 1
    quantiles = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    timesteps = np.rint([beta_ppf(q, alpha, beta_) * total_timesteps for q in quantiles])
    picked: list[float] = []
    last = -1.0
    for t in timesteps:
        if t != last:
            picked.append(float(ms.sigmas[int(t)]))
        last = t
    return _append_zero(picked)


def _incomplete_beta_continued_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), converging for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) CDF, to about 1e-14."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_continued_fraction(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the Beta(a, b) CDF by bisection (the CDF is monotone, so this cannot miss)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:  # exact by symmetry; bisection would land an ulp off and rint() would notice
        return 0.5
    lo, hi = 0.0, 1.0
    while True:  # until lo and hi are neighbouring doubles: full relative precision near 0 too
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if regularized_incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def linear_quadratic(
    ms: ModelSamplingDiscrete, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> np.ndarray:
    """Mochi's schedule: linear in 1 - sigma/sigma_max for the first half of the steps, then quadratic."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
        fractions = [1.0 - f for f in linear + quadratic + [1.0]]
    return np.asarray(fractions, dtype=np.float32) * np.float32(ms.sigma_max)


def kl_optimal(ms: ModelSamplingDiscrete, steps: int) -> np.ndarray:
    """Uniform in arctan(sigma) from sigma_max to sigma_min (A1111 PR 15608), float32 as ComfyUI computes it.

    (ComfyUI divides by steps - 1, so one step gives NaN there; here it gives [sigma_max, 0].)
    """
    ramp = np.arange(steps, dtype=np.float32) / np.float32(max(steps - 1, 1))
    low, high = np.float32(math.atan(float(ms.sigma_min))), np.float32(math.atan(float(ms.sigma_max)))
    return _append_zero(np.tan(ramp * low + (np.float32(1) - ramp) * high))


_SCHEDULES: dict[str, Callable[[ModelSamplingDiscrete, int], np.ndarray]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}


def calculate_sigmas(ms: ModelSamplingDiscrete, scheduler: str, steps: int) -> np.ndarray:
    """The schedule ``scheduler`` over ``steps`` steps (ComfyUI's ``calculate_sigmas``)."""
    try:
        schedule = _SCHEDULES[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}") from None
    return schedule(ms, steps).astype(np.float32)


def basic_scheduler_sigmas(ms: ModelSamplingDiscrete, scheduler: str, steps: int,
                           denoise: float = 1.0) -> np.ndarray:
    """ComfyUI's BasicScheduler: like KSampler's sigmas without its per-sampler adjustments; denoise < 1
    computes int(steps / denoise) steps and keeps the last steps + 1 sigmas (none for denoise <= 0)."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return np.zeros(0, dtype=np.float32)
        total = int(steps / denoise)
    return calculate_sigmas(ms, scheduler, total)[-(steps + 1) :]


def ksampler_sigmas(
    ms: ModelSamplingDiscrete, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str = ""
) -> np.ndarray:
    """The sigmas ComfyUI's KSampler runs for ``steps`` and ``denoise`` (``KSampler.set_steps``).

    denoise < 1 computes ``int(steps / denoise)`` steps and keeps the last ``steps + 1`` sigmas
    (img2img starts part-way down the same schedule); denoise <= 0 gives no sigmas at all,
    which means "return the input latent unchanged".
    """

    def full_schedule(n: int) -> np.ndarray:
        if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = calculate_sigmas(ms, scheduler, n + 1)
            return np.concatenate([sigmas[:-2], sigmas[-1:]])
        return calculate_sigmas(ms, scheduler, n)

    if denoise > 0.9999:
        return full_schedule(steps)
    if denoise <= 0.0:
        return np.zeros(0, dtype=np.float32)
    return full_schedule(int(steps / denoise))[-(steps + 1) :]
