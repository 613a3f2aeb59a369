"""MLX model code for Stable Diffusion 1.x: checkpoints, CLIP, UNet, VAE, LoRA, sampling.

Importing this package first gives MLX's Linux CPU backend an optimised BLAS (see sd/blas.py); it must
happen before anything imports ``mlx.core``.
"""

from sd.blas import load_fast_blas

load_fast_blas()
