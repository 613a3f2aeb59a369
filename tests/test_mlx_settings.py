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


@linux
def test_mlx_keeps_its_gpu_kernels_in_sdgraphs_kernel_folder(monkeypatch, tmp_path):
    """/tmp/mlx/<version>/ptx is emptied by a reboot, and `sdgraph cache` did not know it (issue 14): MLX's
    kernel cache goes under sdgraph's kernel folder, one folder per MLX version, unless the user set it."""
    from importlib import metadata

    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setattr(mlx_settings, "_applied", {})
    mlx_settings.apply_defaults(tmp_path / "kernels")
    expected = tmp_path / "kernels" / f"mlx-{metadata.version('mlx')}-ptx"
    assert mlx_settings.os.environ["MLX_PTX_CACHE_DIR"] == str(expected)
    assert f"MLX_PTX_CACHE_DIR={expected} (sdgraph default)" in mlx_settings.describe()
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/somewhere/else")
    monkeypatch.setattr(mlx_settings, "_applied", {})
    mlx_settings.apply_defaults(tmp_path / "kernels")
    assert mlx_settings.os.environ["MLX_PTX_CACHE_DIR"] == "/somewhere/else"


def test_first_run_notice_is_printed_once_and_only_where_kernels_are_missing(monkeypatch, tmp_path, capsys):
    import mlx.core as mx

    from sd.accel import gpu_cache

    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    folder = tmp_path / "kernels" / "mlx-x-ptx"
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(folder))
    for filled, expected in ((False, True), (True, False)):
        monkeypatch.setattr(gpu_cache, "_state", {"prepared": False, "announced": False})
        if filled:
            (folder / "m.ptx").write_bytes(b"x")
        gpu_cache.prepare()
        gpu_cache.prepare()
        err = capsys.readouterr().err
        assert err.count("compiling GPU kernels for this GPU (first run only") == (1 if expected else 0), err
        assert "sdgraph warmup" in err or not expected
    assert (tmp_path / "kernels").stat().st_mode & 0o777 == 0o700
