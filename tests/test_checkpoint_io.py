"""open_tensors against files written by torch itself (torch.save, safetensors.torch.save_file).

Every comparison is against the torch tensors that were saved, bit for bit (bf16 as its exact float32
widening), never against our own output.
"""

from __future__ import annotations

import shutil
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd.errors import CheckpointError
from sd.io.checkpoint_io import TensorFile, open_tensors


def _reference(t: torch.Tensor) -> np.ndarray:
    """What open_tensors must return for a torch tensor: same values, bf16 widened to float32."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assert_same(tf: TensorFile, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(tf) == sorted(expected)
    for name, tensor in expected.items():
        ref = _reference(tensor)
        got = tf[name]
        assert got.dtype == ref.dtype, name
        assert got.shape == ref.shape, name
        assert tf.shape(name) == tuple(tensor.shape), name
        assert tf.dtype(name) == ref.dtype, name
        # bit-exact: compare raw bytes of contiguous copies (NaN-safe, -0.0-safe)
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(ref).tobytes(), name


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g).half(),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g),
        "first_stage_model.encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=g).bfloat16(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "f64": torch.randn(3, generator=g).double(),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "i16": torch.tensor([7, -8], dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 6.0e-8], dtype=torch.float16),
    }


def _is_memory_mapped(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_ckpt_of_mixed_dtypes_reads_bit_exactly(tmp_path):
    tensors = _mixed_tensors()
    torch.save(tensors, tmp_path / "m.ckpt")
    tf = open_tensors(tmp_path / "m.ckpt")
    _assert_same(tf, tensors)
    assert tf.metadata == {}
    assert tf.stored_dtype("first_stage_model.encoder.conv_in.weight") == "bfloat16"
    assert tf.stored_dtype("model.diffusion_model.input_blocks.0.0.weight") == "float16"
    assert _is_memory_mapped(tf["model.diffusion_model.input_blocks.0.0.bias"])


def test_safetensors_of_mixed_dtypes_reads_bit_exactly(tmp_path):
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt", "note": "x"})
    tf = open_tensors(tmp_path / "m.safetensors")
    _assert_same(tf, tensors)
    assert tf.metadata == {"format": "pt", "note": "x"}
    assert tf.dtype("first_stage_model.encoder.conv_in.weight") == np.float32
    assert tf.stored_dtype("first_stage_model.encoder.conv_in.weight") == "bfloat16"
    assert _is_memory_mapped(tf["model.diffusion_model.input_blocks.0.0.bias"])
    assert not tf["f64"].flags.writeable  # a view of the file must not be writable


def test_strided_views_and_shared_storage(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 10, generator=g)
    half = torch.randn(4, 5, 6, generator=g).half()
    tensors = {
        "base": base,
        "transposed": base.t(),
        "slice_with_offset": base[2:5, 1::3],
        "row": base[4],
        "expanded": torch.randn(1, 3, generator=g).expand(4, 3),  # stride 0
        "permuted_half": half.permute(2, 0, 1),
        "half_tail": half[3:, ::2, 5],
        "bf16_view": torch.randn(5, 4, generator=g).bfloat16()[:, 1:3],
    }
    torch.save(tensors, tmp_path / "views.pt")
    tf = open_tensors(tmp_path / "views.pt")
    _assert_same(tf, tensors)
    assert tf["transposed"].strides == (4, 40)  # a view, not a reordered copy
    assert np.shares_memory(tf["base"], tf["slice_with_offset"])


def test_parameters_and_uint16_new_style_rebuild(tmp_path):
    g = torch.Generator().manual_seed(3)
    module = torch.nn.Linear(3, 2)
    tagged = torch.randn(2, 2, generator=g)
    tagged.note = "python attribute"  # makes torch use _rebuild_from_type_v2
    tensors = {
        "tagged": tagged,
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=g)),
        "u16": torch.tensor([1, 65535, 300], dtype=torch.uint16),  # saved via _rebuild_tensor_v3
        **{f"linear.{k}": v for k, v in module.state_dict().items()},
    }
    torch.save(tensors, tmp_path / "p.pth")
    _assert_same(open_tensors(tmp_path / "p.pth"), tensors)


@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in for Lightning's ModelCheckpoint, so the pickle names it exactly as SD v1 files do."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    return cls


def test_lightning_checkpoint_unwraps_state_dict_and_drops_extras(tmp_path, fake_lightning):
    g = torch.Generator().manual_seed(4)
    state = OrderedDict(
        [
            ("model.diffusion_model.out.2.weight", torch.randn(4, 8, 3, 3, generator=g)),
            ("model_ema.decay", torch.tensor(0.9999)),
            ("model_ema.num_updates", torch.tensor(1234, dtype=torch.int32)),
            ("first_stage_model.decoder.conv_out.bias", torch.randn(3, generator=g).half()),
        ]
    )
    checkpoint = {
        "epoch": 6,
        "global_step": 840000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {
            fake_lightning: {"monitor": None, "best_model_score": np.float64(0.125), "dirpath": "/x"}
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}],
        "lr_schedulers": [],
        "metric": np.float32(1.5),
        "tag": b"bytes survive protocol 2",
        "shape": torch.Size([2, 3]),
        "history": np.array([0.5, 0.25], dtype=np.float32),
        "seen": {1, 2},
    }
    torch.save(checkpoint, tmp_path / "sd.ckpt")
    raw = zipfile.ZipFile(tmp_path / "sd.ckpt").read("sd/data.pkl")
    for global_name in (
        b"pytorch_lightning.callbacks.model_checkpoint",
        b"scalar",
        b"_reconstruct",
        b"torch\nSize",
    ):
        assert global_name in raw  # the file really contains the globals this test is about
    _assert_same(open_tensors(tmp_path / "sd.ckpt"), state)


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_single_wrapper_dict_is_unwrapped(tmp_path, wrapper):
    tensors = {"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(3)}
    torch.save({wrapper: tensors, "info": "trained"}, tmp_path / "w.bin")
    _assert_same(open_tensors(tmp_path / "w.bin"), tensors)


def test_content_decides_the_format_not_the_extension(tmp_path):
    tensors = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(tensors, tmp_path / "real_zip.ckpt")
    save_file(tensors, tmp_path / "real_st.safetensors")
    shutil.copy(tmp_path / "real_zip.ckpt", tmp_path / "misnamed.safetensors")
    shutil.copy(tmp_path / "real_st.safetensors", tmp_path / "misnamed.ckpt")
    shutil.copy(tmp_path / "real_st.safetensors", tmp_path / "no_extension")
    for name in ("misnamed.safetensors", "misnamed.ckpt", "no_extension"):
        _assert_same(open_tensors(tmp_path / name), tensors)
    (tmp_path / "text.ckpt").write_text("this is not a model, just some text")
    with pytest.raises(CheckpointError, match=r"text\.ckpt.*not a checkpoint"):
        open_tensors(tmp_path / "text.ckpt")


def test_deflated_zip_members_are_read(tmp_path):
    tensors = {"w": torch.randn(16, 16, generator=torch.Generator().manual_seed(5)), "z": torch.zeros(300)}
    torch.save(tensors, tmp_path / "plain.ckpt")
    with (
        zipfile.ZipFile(tmp_path / "plain.ckpt") as src,
        zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with zipfile.ZipFile(tmp_path / "deflated.ckpt") as check:
        assert check.getinfo("plain/data/1").compress_type == zipfile.ZIP_DEFLATED
    _assert_same(open_tensors(tmp_path / "deflated.ckpt"), tensors)


def test_legacy_pre_1_6_format_reads_bit_exactly(tmp_path, fake_lightning):
    tensors = {
        **_mixed_tensors(),
        "view": torch.randn(6, 5).t()[1:, ::2],
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    checkpoint = {
        "state_dict": tensors,
        "global_step": 3,
        "callbacks": {fake_lightning: {"x": np.float64(1)}},
    }
    torch.save(checkpoint, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "old.ckpt")
    tf = open_tensors(tmp_path / "old.ckpt")
    _assert_same(tf, tensors)
    assert _is_memory_mapped(tf["f64"])


def test_truncated_legacy_file_is_refused(tmp_path):
    torch.save({"w": torch.ones(64)}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "old.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: .*runs past the end"):
        open_tensors(tmp_path / "cut.ckpt")


def test_missing_empty_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: file not found"):
        open_tensors(tmp_path / "nope.safetensors")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: the file is empty"):
        open_tensors(tmp_path / "empty.ckpt")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"dir\.safetensors: is a directory"):
        open_tensors(tmp_path / "dir.safetensors")


def test_mapping_behaviour(tmp_path):
    save_file({"a": torch.ones(1), "b": torch.zeros(2)}, tmp_path / "m.safetensors")
    tf = open_tensors(str(tmp_path / "m.safetensors"))
    assert len(tf) == 2 and "a" in tf and "c" not in tf and tf.get("c") is None
    assert tf.path == tmp_path / "m.safetensors"
    with pytest.raises(KeyError):
        tf["c"]


def test_random_views_of_shared_storages_match_torch(tmp_path):
    """Many random slices/permutations of a few base tensors, all sharing storage, in every float dtype."""
    rng = np.random.default_rng(11)
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        base = (torch.randn(5, 6, 7, generator=g) * 100).to(dtype)
        for i in range(8):
            view = base.permute(*rng.permutation(3).tolist())
            for dim in range(3):
                start = int(rng.integers(0, view.shape[dim]))
                step = int(rng.integers(1, 3))
                view = view.narrow(dim, start, view.shape[dim] - start)[
                    (slice(None),) * dim + (slice(None, None, step),)
                ]
            tensors[f"{dtype}.{i}"] = view
    torch.save(tensors, tmp_path / "views.ckpt")
    assert len(zipfile.ZipFile(tmp_path / "views.ckpt").namelist()) < 20  # storages really are shared
    _assert_same(open_tensors(tmp_path / "views.ckpt"), tensors)


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is its header length's low byte; 0x80 is also pickle's
    protocol opcode. Content sniffing must look at the '{' of the header first."""
    import json
    import struct

    import numpy as np

    from sd.io.checkpoint_io import open_tensors

    for pad in range(200):
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "__metadata__": {"p": "x" * pad}}).encode()
        if len(header) == 0x80:
            break
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.array([1, 2], np.float32).tobytes())
    assert path.read_bytes()[0] == 0x80
    assert list(open_tensors(path).keys()) == ["w"]
