"""sd/runtime/mlx_settings.py: sdgraph's defaults for MLX's CUDA backend never override what the user set."""

import sys

import pytest

from sd.runtime import mlx_settings

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX's CUDA backend is Linux-only")


@linux
def test_defaults_fill_only_unset_variables(monkeypatch):
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    monkeypatch.setattr(mlx_settings, "_applied", {})
    mlx_settings.apply_defaults()
    assert mlx_settings.os.environ["MLX_MAX_MB_PER_BUFFER"] == "32"
    assert "MLX_MAX_MB_PER_BUFFER=32 (sdgraph default)" in mlx_settings.describe()


@linux
def test_a_user_setting_is_kept_and_reported(monkeypatch):
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "16")
    monkeypatch.setattr(mlx_settings, "_applied", {})
    mlx_settings.apply_defaults()
    assert mlx_settings.os.environ["MLX_MAX_MB_PER_BUFFER"] == "16"
    assert "MLX_MAX_MB_PER_BUFFER=16 (set by you)" in mlx_settings.describe()
