"""Tiled VAE decode (sd/image/tiling.py): exact where no tiling is needed, seamless blending, bounded
memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sd.image.tiling import TILE_THRESHOLD, _starts, decode, decode_tiled, needs_tiling
from sd.loading.checkpoint import load_checkpoint
from sd.synthetic import make_checkpoint


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("tiled") / "tiny.safetensors", seed=5, parts=("vae",))
    return load_checkpoint(path, dtype="float32").vae


def _latent(h, w, seed=0):
    return mx.array(np.random.default_rng(seed).standard_normal((1, h, w, 4)).astype(np.float32))


@pytest.mark.slow
def test_below_threshold_is_bit_identical(vae):
    latent = _latent(24, 32)
    assert not needs_tiling(latent.shape)
    assert np.array_equal(np.array(decode(vae, latent)), np.array(vae.decode(latent)))


@pytest.mark.slow
def test_one_tile_is_bit_identical(vae):
    latent = _latent(16, 16)
    assert np.array_equal(np.array(decode_tiled(vae.decode, latent, tile=16, overlap=4)),
                          np.array(vae.decode(latent)))


def test_threshold_picks_tiling_for_1024_images():
    assert not needs_tiling((1, 64, 64, 4))      # 512x512
    assert not needs_tiling((1, 96, 96, 4))      # 768x768
    assert needs_tiling((1, 128, 128, 4))        # 1024x1024
    assert TILE_THRESHOLD == 96 * 96


def test_tiles_cover_the_latent_with_full_size_tiles():
    for length, tile, overlap in [(100, 64, 16), (128, 64, 16), (65, 64, 16), (200, 32, 8)]:
        starts = _starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def _pixelwise(latent):
    """A 'decoder' where each output pixel depends only on its latent pixel: tiling must reproduce it."""
    b, h, w, _ = latent.shape
    rgb = mx.tanh(latent[..., :3] * 0.7 + latent[..., 3:] * 0.2)
    return mx.broadcast_to(rgb[:, :, None, :, None, :], (b, h, 8, w, 8, 3)).reshape(b, h * 8, w * 8, 3)


@pytest.mark.slow
@pytest.mark.parametrize("shape,tile,overlap", [((40, 56), 24, 8), ((37, 29), 16, 4), ((64, 20), 16, 15)])
def test_blending_is_seamless_for_a_local_decoder(shape, tile, overlap):
    latent = _latent(*shape, seed=1)
    tiled = np.array(decode_tiled(_pixelwise, latent, tile=tile, overlap=overlap))
    np.testing.assert_allclose(tiled, np.array(_pixelwise(latent)), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_tiled_real_decoder_shape_and_calls(vae):
    latent = _latent(40, 56, seed=2)
    calls = []

    def spy(z):
        calls.append(z.shape)
        return vae.decode(z)

    out = decode(vae, latent, decode_fn=spy, threshold=24 * 24, tile=24, overlap=8)
    assert out.shape == (1, 320, 448, 3)
    assert len(calls) == 2 * 3 and all(s == (1, 24, 24, 4) for s in calls)  # same shape: compiled once
    assert bool(mx.all(mx.isfinite(out)).item())
    # a random-weight VAE's mid attention sees one tile, so tiles differ from the whole, but not wildly
    whole = np.array(vae.decode(latent))
    assert np.abs(np.array(out) - whole).mean() < np.abs(whole).mean()


@pytest.mark.slow
def test_tiling_bounds_peak_memory(vae):
    latent = _latent(96, 96, seed=3)
    mx.eval(latent)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(vae.decode(latent))
    whole = mx.get_peak_memory() - base
    mx.reset_peak_memory()
    mx.eval(decode_tiled(vae.decode, latent, tile=32, overlap=8))
    tiled = mx.get_peak_memory() - base
    assert tiled < whole / 2, (tiled, whole)


def test_a_tiled_decode_reports_each_tile_and_a_large_vaedecode_shows_progress():
    """A 1024² decode takes ~20 s on a CPU: it must not sit silent (issue 21). Each tile is one step."""
    latent = _latent(40, 56, seed=3)
    steps = []
    decode_tiled(_pixelwise, latent, tile=24, overlap=8, progress=lambda i, n: steps.append((i, n)))
    n = len(_starts(40, 24, 8)) * len(_starts(56, 24, 8))
    assert steps == [(i, n) for i in range(1, n + 1)] and n > 1
    steps.clear()
    decode(None, _latent(8, 8, seed=4), decode_fn=_pixelwise, progress=lambda i, n: steps.append((i, n)))
    assert steps == []  # untiled: one decode, nothing to count


def test_vaedecode_node_passes_tile_progress_to_the_run(monkeypatch):
    """The node wires the tiles to ctx.progress (what draws the CLI's progress bar)."""
    from types import SimpleNamespace

    import nodes.latents as latents
    from nodes.values import Latent

    seen = []
    monkeypatch.setattr(latents.models, "vae_for", lambda vae, log: SimpleNamespace(dtype=mx.float32))
    monkeypatch.setattr(latents.models, "vae_decoder", lambda model: _pixelwise)
    ctx = SimpleNamespace(log=print, progress=lambda i, n: seen.append((i, n)))
    latents.VAEDecode(Latent(_latent(128, 128, seed=5)), vae=None, ctx=ctx)  # a 1024² image: tiled
    assert seen == [(i, 9) for i in range(1, 10)]
