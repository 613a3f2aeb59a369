"""MLX model code for Stable Diffusion 1.x: checkpoints, CLIP, UNet, VAE, LoRA, sampling.

Importing this package (or any module of it) does nothing. A program that runs models calls
`sd.runtime.setup()` first, before anything imports ``mlx.core``: it gives MLX's Linux CPU backend an
optimised BLAS and sets sdgraph's MLX defaults (see sd/runtime/__init__.py).
"""
