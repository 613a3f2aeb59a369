"""Process set-up: the BLAS MLX uses on a Linux CPU, MLX backend settings, environment switches."""
