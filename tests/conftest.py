"""Shared test set-up. Importing `sd` first loads an optimised BLAS before anything imports mlx."""

import sd  # noqa: F401  (must precede every mlx import)
