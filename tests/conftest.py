"""Shared test set-up: sdgraph's one runtime set-up, before anything imports mlx (the optimised BLAS)."""

from sd import runtime

runtime.setup()
