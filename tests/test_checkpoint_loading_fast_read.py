"""sd/loading/checkpoint.py reads a checked safetensors file with MLX's own loader on a GPU: the weights
must be exactly those of the numpy reader (the reference), for every dtype it takes, and a file it cannot
take (here: a legacy torch zip) goes through the numpy reader."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from sd.io.checkpoint_io import open_tensors
from sd.loading import checkpoint as C
from sd.synthetic import make_checkpoint


def _weights(path, part, mlx_reads, dtype):
    tensors, split = C._open_and_split(path)
    keys = split[part]
    _, model = C._build(path, part, keys, tensors, mx.float16 if dtype == "float16" else mx.float32,
                        mlx_reads=mlx_reads)
    return dict(tree_flatten(model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_mlx_reader_gives_the_numpy_readers_weights(tmp_path, stored, part):
    path = make_checkpoint(tmp_path / f"t-{stored}.safetensors", "tiny", dtype=stored, seed=4)
    target = "float16" if stored == "float16" else "float32"
    ours, mlx = _weights(path, part, False, target), _weights(path, part, True, target)
    assert ours.keys() == mlx.keys()
    for name, value in ours.items():
        assert value.dtype == mlx[name].dtype and value.shape == mlx[name].shape, name
        assert np.array_equal(np.array(value), np.array(mlx[name])), name


@pytest.mark.slow
def test_the_mlx_reader_is_used_only_for_checked_safetensors(tmp_path, monkeypatch):
    calls = []
    real = mx.load
    monkeypatch.setattr(C.mx, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    st = make_checkpoint(tmp_path / "t.safetensors", "tiny")
    zp = make_checkpoint(tmp_path / "t.ckpt", "tiny")
    unet_keys = list(C._open_and_split(st)[1]["unet"].values())
    C._tensor_source(open_tensors(zp), unet_keys, True)
    C._tensor_source(open_tensors(st), unet_keys, False)
    assert calls == []
    C._tensor_source(open_tensors(st), unet_keys, True)
    assert len(calls) == 1
