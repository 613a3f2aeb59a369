"""Upscale models: random-weight ESRGAN (old, BSRGAN and Real-ESRGAN layouts; x1/x2/x4/x8 and the
pixel-unshuffle x2/x1 variants) and SRVGGNetCompact files equal spandrel (ComfyUI's loader) built from the
same state dict; tiled upscaling equals a torch transcription of ComfyUI's tiled_scale and, away from the
tile seams, the untiled output; out-of-memory errors halve the tile; bad files fail clearly."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from sd.errors import ArchitectureError, CheckpointError
from sd.image.upscale import is_out_of_memory, run_model, tiled_scale, upscale_image
from sd.loading.upscale_models import inspect_upscale_model, load_upscale_model
from sd.synthetic.upscale import compact_state, esrgan_state, write_upscale_model

torch = pytest.importorskip("torch")
from comfy_image_reference import tiled_scale_multidim  # noqa: E402
from spandrel_reference import load as spandrel_load  # noqa: E402
from spandrel_reference import spandrel  # noqa: E402

try:
    spandrel()
except ImportError as e:
    pytest.skip(f"spandrel (the reference) is not installed: {e}", allow_module_level=True)

VARIANTS = {  # name: (state, file suffix)
    "esrgan-old-x4": (lambda: esrgan_state("old", scale=4), ".pth"),
    "esrgan-new-x4": (lambda: esrgan_state("new", scale=4, num_blocks=2, seed=1), ".safetensors"),
    "bsrgan-x2": (lambda: esrgan_state("bsrgan", scale=2, seed=2), ".pth"),
    "esrgan-old-x1": (lambda: esrgan_state("old", scale=1, seed=3), ".pth"),
    "esrgan-old-x8": (lambda: esrgan_state("old", scale=8, num_feat=8, seed=4), ".safetensors"),
    "real-esrgan-x2plus": (lambda: esrgan_state("new", unshuffle=2, seed=5), ".pth"),
    "real-esrgan-x1": (lambda: esrgan_state("new", unshuffle=4, seed=6), ".pth"),
    "compact-x4": (lambda: compact_state(scale=4, num_conv=3), ".pth"),
    "compact-x2": (lambda: compact_state(scale=2, seed=1), ".safetensors"),
}


def _nchw(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).transpose(0, 3, 1, 2)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_upscale_model_equals_spandrel(tmp_path, name):
    make, suffix = VARIANTS[name]
    state = make()
    path = write_upscale_model(tmp_path / f"{name}{suffix}", state)
    ours = load_upscale_model(path, dtype=mx.float32)
    ref = spandrel_load(state)
    assert ours.scale == ref.scale
    x = _image(21, 26)  # odd sides: the unshuffling models pad (reflect) to multiples of 4 and crop back
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()                   # spandrel's call: pad, run, clamp, crop
        raw = ref.model(torch.from_numpy(_image(24, 28, 1))).numpy()  # the network alone, unclamped
    got = _nchw(run_model(ours, mx.array(x.transpose(0, 2, 3, 1))))
    got_raw = _nchw(ours(mx.array(_image(24, 28, 1).transpose(0, 2, 3, 1))))
    assert got.shape == expected.shape == (1, 3, 21 * ref.scale, 26 * ref.scale)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got_raw - raw).max() <= 1e-4
    assert expected.std() > 0.02 and 0.05 < expected.mean() < 0.95  # outputs carry signal, not clamped flat


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fp16_files_load_as_stored(tmp_path, suffix):
    """Most released models are fp16: loaded in fp32 they equal spandrel on the same fp16-rounded weights."""
    state = esrgan_state("new", scale=2, seed=11)
    path = write_upscale_model(tmp_path / f"2x-half{suffix}", state, dtype="float16")
    ours = load_upscale_model(path, dtype=mx.float32)
    ref = spandrel_load({k: v.astype(np.float16).astype(np.float32) for k, v in state.items()})
    x = _image(20, 24, seed=12)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert np.abs(_nchw(run_model(ours, mx.array(x.transpose(0, 2, 3, 1)))) - expected).max() <= 1e-4


def test_basicsr_wrappers_prefixes_and_config(tmp_path):
    """Real-ESRGAN .pth files wrap the weights: params_ema (the EMA weights) wins over params; a
    `module.` prefix (DataParallel) is dropped. Sizes are read off the shapes."""
    ema, raw = esrgan_state("new", scale=4, num_feat=8, num_blocks=3, seed=1), esrgan_state("new", seed=2)
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params": {k: torch.from_numpy(v) for k, v in raw.items()},
                "params_ema": {k: torch.from_numpy(v) for k, v in ema.items()}}, path)
    config = inspect_upscale_model(path)
    assert (config.num_feat, config.num_blocks, config.num_grow, config.scale) == (8, 3, 32, 4)
    model = load_upscale_model(path, dtype=mx.float32)
    np.testing.assert_array_equal(np.array(model.conv_first.weight),
                                  ema["conv_first.weight"].transpose(0, 2, 3, 1))

    compact = compact_state(scale=4, num_feat=12, num_conv=5)
    path = tmp_path / "realesr-general-x4v3.pth"
    torch.save({"params": {f"module.{k}": torch.from_numpy(v) for k, v in compact.items()}}, path,
               _use_new_zipfile_serialization=False)  # torch's pre-1.6 format, as older releases were saved
    config = inspect_upscale_model(path)
    assert (config.num_feat, config.num_conv, config.upscale, config.out_channels) == (12, 5, 4, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name, size, tile, overlap", [
    ("compact-x2", (70, 45), 32, 8),           # 3 x 2 tiles, narrow last ones
    ("real-esrgan-x2plus", (50, 61), 24, 6),   # tiles of odd widths through the padding model
    ("esrgan-old-x4", (30, 30), 32, 8),        # fits in one tile: run whole
])
def test_tiling_equals_comfyui_tiled_scale(tmp_path, name, size, tile, overlap):
    make, suffix = VARIANTS[name]
    state = make()
    model = load_upscale_model(write_upscale_model(tmp_path / f"m{suffix}", state), dtype=mx.float32)
    ref = spandrel_load(state)
    x = np.concatenate([_image(*size, seed=1), _image(*size, seed=2)])  # a batch of two
    with torch.no_grad():
        expected = tiled_scale_multidim(torch.from_numpy(x), ref, (tile, tile), overlap, ref.scale)
        expected = expected.clamp(0, 1)
    got = _nchw(upscale_image(model, mx.array(x.transpose(0, 2, 3, 1)), tile=tile, overlap=overlap))
    assert got.shape == tuple(expected.shape)
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_tiled_equals_untiled_away_from_the_seams(tmp_path):
    """A Compact model with 3 convs sees 3 pixels each way: tiles overlapping by 16 agree with the untiled
    output exactly except within 3 (input) pixels of a tile's inner edge, where the blend mixes in the
    tile's zero-padded border; there the error stays small."""
    state = compact_state(scale=2, num_conv=1, seed=3)
    model = load_upscale_model(write_upscale_model(tmp_path / "c.pth", state), dtype=mx.float32)
    x = mx.array(_image(100, 90, seed=4).transpose(0, 2, 3, 1))
    whole = np.array(run_model(model, x))[0]
    tiled = np.array(upscale_image(model, x, tile=48, overlap=16))[0]
    starts = [0, 32, 64]  # ComfyUI's starts for a side of 100 (and 90) with tiles of 48 overlapping by 16
    seam = np.zeros(whole.shape[:2], dtype=bool)
    for p in starts[1:]:  # inner tile edges: a start, and the end of the tile before it
        for edge in (p, p - 32 + 48):
            lo, hi = max(0, (edge - 3) * 2), (edge + 3) * 2
            seam[lo:hi, :] = True
            seam[:, lo:hi] = True
    err = np.abs(tiled - whole).max(axis=-1)
    assert err[~seam].max() <= 1e-5
    assert 0 < err[seam].max() < 0.25 and err[seam].mean() < 0.02
    assert np.abs(tiled - whole).max() > 1e-3  # the comparison can see a seam


@pytest.mark.slow
def test_out_of_memory_halves_the_tile_as_comfyui_does(tmp_path):
    state = compact_state(scale=2, seed=5)
    model = load_upscale_model(write_upscale_model(tmp_path / "c.pth", state), dtype=mx.float32)
    calls = []

    class Limited:  # the model, but "out of memory" on any tile side above `limit`
        scale, pad_multiple, dtype = model.scale, model.pad_multiple, model.dtype

        def __init__(self, limit):
            self.limit = limit

        def __call__(self, x):
            calls.append(x.shape[1])
            if max(x.shape[1:3]) > self.limit:
                raise RuntimeError("[metal::malloc] Unable to allocate 34359738368 bytes.")
            return model(x)

    x = mx.array(_image(300, 280, seed=6).transpose(0, 2, 3, 1))
    logs = []
    got = upscale_image(Limited(130), x, log=logs.append)           # 512 -> 256 -> 128
    np.testing.assert_array_equal(np.array(got), np.array(upscale_image(model, x, tile=128)))
    assert calls[0] == 300 and any("256" in m for m in logs) and any("128" in m for m in logs)
    with pytest.raises(RuntimeError, match="Unable to allocate"):   # below 128 ComfyUI gives up
        upscale_image(Limited(100), x)
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shapes do not match"))

    def broken(_x):
        raise RuntimeError("shapes do not match")
    with pytest.raises(RuntimeError, match="shapes"):                # other errors are not retried
        tiled_scale(broken, x, 2)


@pytest.mark.slow
def test_large_images_are_tiled_by_default():
    """The default 512-pixel tiles bound the model's working memory: a 4x model never sees more than a
    512x512 tile, whatever the image size."""
    seen = []

    def spy(x):
        seen.append(tuple(x.shape[1:3]))
        return mx.zeros((x.shape[0], x.shape[1] * 4, x.shape[2] * 4, 3))

    class Spy:
        scale, pad_multiple, dtype = 4, 1, mx.float32
        __call__ = staticmethod(spy)

    out = upscale_image(Spy(), mx.zeros((1, 1100, 600, 3)))
    assert out.shape == (1, 4400, 2400, 3)
    assert max(max(s) for s in seen) == 512 and len(seen) == 3 * 2
    assert math.isclose(float(mx.sum(out)), 0.0)


def _write(tmp_path, name, state):
    return write_upscale_model(tmp_path / name, state)


@pytest.mark.slow
def test_bad_files_fail_clearly(tmp_path):
    from sd.synthetic import make_checkpoint

    sd15 = make_checkpoint(tmp_path / "v1-5.safetensors", "tiny", parts=("vae",))
    with pytest.raises(ArchitectureError, match="Stable Diffusion checkpoint"):
        inspect_upscale_model(sd15)
    with pytest.raises(ArchitectureError, match="not a supported upscale model"):
        inspect_upscale_model(_write(tmp_path, "swinir.pth", {"layers.0.residual_group.blocks.0.norm1.weight":
                                                               np.zeros(4, np.float32)}))
    state = esrgan_state("old")
    del state["model.8.weight"]  # the hr conv of a x4 model
    with pytest.raises(CheckpointError, match="1 missing: conv_hr.weight"):
        inspect_upscale_model(_write(tmp_path, "cut.pth", state))
    del state["model.8.bias"]
    with pytest.raises(ArchitectureError, match="cannot place"):
        inspect_upscale_model(_write(tmp_path, "cut2.pth", state))
    state = esrgan_state("new")
    state["body.0.rdb2.conv3.weight"] = np.zeros((32, 7, 3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"wrong shape: body\.0\.rdb2\.conv3\.weight"):
        inspect_upscale_model(_write(tmp_path, "edited.safetensors", state))
    plus = esrgan_state("old")
    plus["model.1.sub.0.RDB1.conv1x1.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    with pytest.raises(ArchitectureError, match="ESRGAN\\+"):
        inspect_upscale_model(_write(tmp_path, "plus.pth", plus))


def test_a_pickle_that_calls_something_is_refused(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "4x-evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model.0.weight": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="print"):
        load_upscale_model(path)


def test_a_safetensors_header_whose_length_starts_like_a_pickle_loads(tmp_path):
    """sd/io sniffs formats by their first bytes; a safetensors header of 0x80 + 256k bytes starts with the
    pickle opcode PROTO (0x80) and was once refused as 'a bare pickle'."""
    from sd.io.checkpoint_io import open_tensors

    for n in range(1, 40):
        path = _write(tmp_path, f"c{n}.safetensors", {f"body.{i}.weight": np.zeros(1, np.float32)
                                                      for i in range(n)})
        if path.read_bytes()[0] == 0x80:
            assert len(open_tensors(path)) == n
            return
    pytest.fail("no header length with a low byte of 0x80 was produced")


@pytest.mark.slow
@pytest.mark.parametrize("opts", ["here", "compiled", "im2col"])
def test_the_accelerated_upscaler_equals_the_plain_model(tmp_path, opts):
    """sd.accel's FastUpscaler (this device's levers: the C 3x3 convs on a CPU with 64+ channels; or
    mx.compile; or im2col convs) against the plain forward, the oracle."""
    from sd.accel.compiled import FastUpscaler
    from sd.accel.ops import FastOptions

    options = {"here": None, "compiled": FastOptions(), "im2col": FastOptions(conv="im2col")}[opts]
    state = esrgan_state("old", scale=2, num_feat=64, num_blocks=1, seed=8)
    model = load_upscale_model(write_upscale_model(tmp_path / "m.pth", state), dtype=mx.float32)
    x = mx.array(_image(40, 36, seed=9).transpose(0, 2, 3, 1))  # 80x72 after the upsampling: C convs
    fast = FastUpscaler(model, options)
    assert (fast.scale, fast.dtype) == (2, mx.float32)
    assert np.abs(np.array(run_model(fast, x)) - np.array(run_model(model, x))).max() <= 1e-4
