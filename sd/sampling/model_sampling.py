"""SD1.x noise schedule as ComfyUI's ``ModelSamplingDiscrete`` with eps prediction (``EPS``).

The sigma table is built in float64 and stored float32, exactly as ComfyUI does, because every
scheduler and the UNet's timestep are read off this table: a different rounding here would
move timesteps and so change images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

LATENT_SCALE_FACTOR = 0.18215  # SD1.x VAE latent scale (ComfyUI's latent_formats.SD15)


def _scaled_linear_sigmas(linear_start: float, linear_end: float, timesteps: int) -> np.ndarray:
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


@dataclass(frozen=True)
class ModelSamplingDiscrete:
    """Discrete eps-prediction schedule: sigma <-> timestep maps and the EPS input/output rules."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000
    sigma_data: float = 1.0
    sigmas: np.ndarray = field(init=False, repr=False)
    log_sigmas: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sigmas64 = _scaled_linear_sigmas(self.linear_start, self.linear_end, self.num_timesteps)
        object.__setattr__(self, "sigmas", sigmas64.astype(np.float32))
        object.__setattr__(self, "log_sigmas", np.log(sigmas64).astype(np.float32))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: float | np.ndarray) -> np.ndarray:
        """Index of the table entry nearest in log-sigma (first on ties): the UNet's timestep."""
        log_sigma = np.log(np.asarray(sigma, dtype=np.float32))
        distances = np.abs(log_sigma[None, ...] - self.log_sigmas.reshape((-1,) + (1,) * log_sigma.ndim))
        return np.argmin(distances, axis=0)

    def sigma(self, timestep: float | np.ndarray) -> np.ndarray:
        """Sigma at a (fractional) timestep: log-linear interpolation of the table, in float32."""
        t = np.clip(np.asarray(timestep, dtype=np.float32), 0, len(self.sigmas) - 1)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.floor(t)
        log_sigma = (np.float32(1) - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return np.exp(log_sigma.astype(np.float32))

    def calculate_input(self, sigma: mx.array, x: mx.array) -> mx.array:
        """The UNet sees x / sqrt(sigma^2 + 1) (x is NHWC, sigma per batch element)."""
        sigma = sigma.reshape(-1, 1, 1, 1)
        return x / mx.sqrt(sigma**2 + self.sigma_data**2)

    def calculate_denoised(self, sigma: mx.array, eps: mx.array, x: mx.array) -> mx.array:
        return x - eps * sigma.reshape(-1, 1, 1, 1)

    def noise_scaling(
        self, sigma: float, noise: mx.array, latent: mx.array, max_denoise: bool = False
    ) -> mx.array:
        """Starting point of sampling: at full denoise the noise gets the variance of x_T itself."""
        scale = (1.0 + sigma**2) ** 0.5 if max_denoise else sigma
        return noise * scale + latent

    def inverse_noise_scaling(self, sigma: float, latent: mx.array) -> mx.array:
        return latent

    def is_max_denoise(self, first_sigma: float) -> bool:
        """ComfyUI's ``KSAMPLER.max_denoise``: starting at (or above) the largest sigma."""
        return abs(first_sigma - self.sigma_max) <= 1e-5 * max(abs(first_sigma), abs(self.sigma_max)) or (
            first_sigma > self.sigma_max
        )


SD1_MODEL_SAMPLING = ModelSamplingDiscrete()
