"""SD1.x noise schedules and prediction types, as ComfyUI's ``ModelSamplingDiscrete`` and its patches.

The sigma table is built in float64 and stored float32, exactly as ComfyUI does, because every
scheduler and the UNet's timestep are read off this table: a different rounding here would
move timesteps and so change images.

What the UNet's output means (``prediction``; ComfyUI's ``EPS``, ``V_PREDICTION``, ``X0`` and the
``LCM`` class of comfy_extras/nodes_model_advanced.py):

- ``eps``: the noise; ``denoised = x - out * sigma``.
- ``v_prediction``: v = alpha * eps - sigma_vp * x0, in k-diffusion's scaling
  ``denoised = x * sd^2 / (sigma^2 + sd^2) - out * sigma * sd / sqrt(sigma^2 + sd^2)``.
- ``x0``: the clean latent itself.
- ``lcm``: an eps model distilled for consistency sampling: the table keeps 50 of the 1000 timesteps
  (ComfyUI's ``ModelSamplingDiscreteDistilled``: every 20th, ending at 999) and the prediction is mixed
  with the input by LCM's boundary conditions ``c_skip = sd^2 / ((10 t)^2 + sd^2)``,
  ``c_out = 10 t / sqrt((10 t)^2 + sd^2)`` with sd = 0.5.

``zsnr`` rescales the table to zero terminal SNR (Lin et al. 2023; ComfyUI's
``rescale_zero_terminal_snr_sigmas``): the last timestep becomes (almost) pure noise. Current ComfyUI
rescales the float64 table before storing it float32 (older versions rescaled the stored float32 one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

LATENT_SCALE_FACTOR = 0.18215  # SD1.x VAE latent scale (ComfyUI's latent_formats.SD15)
PREDICTIONS = ("eps", "v_prediction", "lcm", "x0")  # ComfyUI's ModelSamplingDiscrete choices, in order
LCM_ORIGINAL_TIMESTEPS = 50  # ModelSamplingDiscreteDistilled.original_timesteps
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0
# ComfyUI pins the rescaled last alpha_bar here rather than at 0 (an infinite sigma)
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def _scaled_linear_sigmas(linear_start: float, linear_end: float, timesteps: int) -> np.ndarray:
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def rescale_zero_terminal_snr_sigmas(sigmas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so that it ends at 0 and starts where it did; back to sigmas."""
    alphas_bar_sqrt = np.sqrt(1.0 / (sigmas * sigmas + 1.0))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return np.sqrt((1.0 - alphas_bar) / alphas_bar)


@dataclass(frozen=True)
class ModelSamplingDiscrete:
    """Discrete schedule: sigma <-> timestep maps and the input/output rules of one prediction type."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000
    sigma_data: float = 1.0
    prediction: str = "eps"
    zsnr: bool = False
    sigmas: np.ndarray = field(init=False, repr=False)
    log_sigmas: np.ndarray = field(init=False, repr=False)
    # alpha_bar of every one of the num_timesteps timesteps (TCD reads it), whatever the table keeps
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    skip_steps: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; "
                             f"choose one of {', '.join(PREDICTIONS)}")
        sigmas64 = _scaled_linear_sigmas(self.linear_start, self.linear_end, self.num_timesteps)
        if self.zsnr:
            sigmas64 = rescale_zero_terminal_snr_sigmas(sigmas64)
        sigmas, log_sigmas = sigmas64.astype(np.float32), np.log(sigmas64).astype(np.float32)
        object.__setattr__(self, "alphas_cumprod", 1.0 / (sigmas.astype(np.float64) ** 2 + 1.0))
        skip = 1
        if self.prediction == "lcm":  # ModelSamplingDiscreteDistilled: keep timesteps 19, 39, ..., 999
            skip = self.num_timesteps // LCM_ORIGINAL_TIMESTEPS
            sigmas = sigmas[skip - 1 :: skip][:LCM_ORIGINAL_TIMESTEPS].copy()
            log_sigmas = np.log(sigmas)  # ComfyUI takes the log of the float32 values picked
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", log_sigmas)
        object.__setattr__(self, "skip_steps", skip)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: float | np.ndarray) -> np.ndarray:
        """The UNet's timestep: the table entry nearest in log-sigma (first on ties), 0..num_timesteps-1."""
        log_sigma = np.log(np.asarray(sigma, dtype=np.float32))
        distances = np.abs(log_sigma[None, ...] - self.log_sigmas.reshape((-1,) + (1,) * log_sigma.ndim))
        return np.argmin(distances, axis=0) * self.skip_steps + (self.skip_steps - 1)

    def sigma(self, timestep: float | np.ndarray) -> np.ndarray:
        """Sigma at a (fractional) timestep: log-linear interpolation of the table, in float32."""
        t = np.asarray(timestep, dtype=np.float32)
        if self.skip_steps != 1:
            t = ((t - (self.skip_steps - 1)) / self.skip_steps).astype(np.float32)
        t = np.clip(t, 0, len(self.sigmas) - 1)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.floor(t)
        log_sigma = (np.float32(1) - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return np.exp(log_sigma.astype(np.float32))

    def calculate_input(self, sigma: mx.array, x: mx.array) -> mx.array:
        """The UNet sees x / sqrt(sigma^2 + 1) (x is NHWC, sigma per batch element)."""
        sigma = sigma.reshape(-1, 1, 1, 1)
        return x / mx.sqrt(sigma**2 + self.sigma_data**2)

    def calculate_denoised(self, sigma: mx.array, model_output: mx.array, x: mx.array) -> mx.array:
        """The clean-latent prediction from the UNet's output at `sigma` (see the module docstring)."""
        if self.prediction == "x0":
            return model_output
        sigma = sigma.reshape(-1, 1, 1, 1)
        if self.prediction == "v_prediction":
            sd2 = self.sigma_data**2
            root = mx.sqrt(sigma**2 + sd2)
            return x * sd2 / (sigma**2 + sd2) - model_output * sigma * self.sigma_data / root
        x0 = x - model_output * sigma
        if self.prediction == "eps":
            return x0
        # lcm: the timestep of each batch element's sigma (a few floats, read back to the host)
        scaled = mx.array(self.timestep(np.array(sigma.astype(mx.float32)).reshape(-1)),
                          dtype=mx.float32).reshape(-1, 1, 1, 1) * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / mx.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
        return c_out * x0 + c_skip * x

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


def model_sampling_for(prediction: str = "eps", zsnr: bool = False) -> ModelSamplingDiscrete:
    """The SD1.x schedule with this prediction type and zero-terminal-SNR choice."""
    if prediction == "eps" and not zsnr:
        return SD1_MODEL_SAMPLING
    return ModelSamplingDiscrete(prediction=prediction, zsnr=zsnr)
