"""`sdgraph doctor` reports the environment and runs a tiny workflow end to end."""

from __future__ import annotations

import io

import pytest

from nodes.doctor import run_doctor


@pytest.mark.slow
def test_doctor_reports_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SDGRAPH_CACHE_DIR", str(tmp_path / "cache"))  # reported, never written
    out = io.StringIO()
    assert run_doctor(out) == 0
    text = out.getvalue()
    for label in ("mlx:", "device:", "blas (cpu):", "dtypes:", "cache:", "first run:", "identical re-run:"):
        assert label in text
    assert "unet float" in text and "0 nodes ran" in text
    assert text.rstrip().endswith("OK")
    # no results cached (the CPU kernels' build may land in <cache>/kernels when this test runs first)
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file() and p.relative_to(cache).parts[0] != "kernels"]
