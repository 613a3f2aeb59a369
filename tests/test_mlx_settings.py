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
    monkeypatch.setenv("SDGRAPH_COMPILE", "1")  # a run that compiles its graphs (auto: see below)
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


def _fresh_policy(monkeypatch, tmp_path):
    from sd.accel import gpu_cache

    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels" / "mlx-x-ptx"))
    monkeypatch.setattr(gpu_cache, "_state", {"prepared": False, "announced": False})
    return gpu_cache


def test_nvidia_first_run_goes_uncompiled_until_a_compiled_run_marks_the_graph(monkeypatch, tmp_path, capsys):
    gpu_cache = _fresh_policy(monkeypatch, tmp_path)
    monkeypatch.delenv("SDGRAPH_COMPILE", raising=False)
    assert gpu_cache.wants_compile("unet-abc", cuda=True) is False
    assert gpu_cache.wants_compile("vae.decode-abc", cuda=True) is False
    err = capsys.readouterr().err
    assert err.count("running without compiled GPU graphs") == 1 and "sdgraph warmup" in err
    monkeypatch.setenv("SDGRAPH_COMPILE", "1")          # what `sdgraph warmup` sets
    assert gpu_cache.wants_compile("unet-abc", cuda=True) is True
    monkeypatch.setenv("SDGRAPH_COMPILE", "auto")
    assert gpu_cache.wants_compile("unet-abc", cuda=True) is True       # marked by the compiled run
    assert gpu_cache.wants_compile("vae.decode-abc", cuda=True) is False  # not built yet
    monkeypatch.setenv("SDGRAPH_COMPILE", "off")
    assert gpu_cache.wants_compile("unet-abc", cuda=True) is False
    assert capsys.readouterr().err.count("running without compiled") == 0  # said once per process


def test_compiling_stays_the_default_off_nvidia(monkeypatch, tmp_path, capsys):
    gpu_cache = _fresh_policy(monkeypatch, tmp_path)
    monkeypatch.delenv("SDGRAPH_COMPILE", raising=False)
    assert gpu_cache.wants_compile("unet-abc", cuda=False) is True
    assert not (tmp_path / "kernels").exists() and capsys.readouterr().err == ""


def test_compile_switch_spellings(monkeypatch):
    from sd.runtime import switches

    for text, value in (("", None), ("auto", None), (" AUTO ", None), ("1", True), ("on", True),
                        ("no", False)):
        assert switches.auto_flag("SDGRAPH_COMPILE", {"SDGRAPH_COMPILE": text}) is value
    with pytest.raises(switches.SwitchError, match="SDGRAPH_COMPILE='maybe' is not auto, on or off"):
        switches.auto_flag("SDGRAPH_COMPILE", {"SDGRAPH_COMPILE": "maybe"})
    assert switches.check({"SDGRAPH_COMPILE": "maybe"})


def test_graph_key_follows_architecture_and_levers_not_weights():
    import mlx.core as mx
    import mlx.nn as nn

    from sd.accel import gpu_cache
    from sd.accel.ops import FastOptions

    a, b, wide = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 16)
    b.weight = mx.ones_like(b.weight)
    opts = FastOptions()
    assert gpu_cache.graph_key("unet", a, opts) == gpu_cache.graph_key("unet", b, opts)
    assert gpu_cache.graph_key("unet", a, opts) != gpu_cache.graph_key("unet", wide, opts)
    assert gpu_cache.graph_key("unet", a, opts) != gpu_cache.graph_key("unet", a, opts.with_(conv="im2col"))
    assert gpu_cache.graph_key("unet", a, opts) != gpu_cache.graph_key("vae.decode", a, opts)
    a16 = nn.Linear(4, 8)
    a16.set_dtype(mx.float16)
    assert gpu_cache.graph_key("unet", a, opts) != gpu_cache.graph_key("unet", a16, opts)
