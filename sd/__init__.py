"""MLX model code for Stable Diffusion 1.x: checkpoints, CLIP, UNet, VAE, LoRA, sampling.

Importing this package first gives MLX's Linux CPU backend an optimised BLAS (see sd/runtime/blas.py; it must happen
before anything imports ``mlx.core``) and sets sdgraph's defaults for MLX's CUDA backend (sd/runtime/mlx_settings.py;
before any GPU work).
"""

from sd.runtime.blas import load_fast_blas
from sd.runtime.mlx_settings import apply_defaults

load_fast_blas()
apply_defaults()
