"""Hostile and corrupt checkpoint files: nothing from the file may run, every failure is CheckpointError.

Payloads try to create a marker file. Each one is first shown to work with Python's ordinary unpickler
(so the test proves something), then open_tensors must refuse it by naming the global, and the marker
must not exist afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd.errors import CheckpointError
from sd.io.checkpoint_io import open_tensors

# ---- hand-written pickle opcodes (protocol 2, no memo) ----

PROTO2 = b"\x80\x02"
STOP = b"."


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def num(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def lst(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def dict_of(**items: bytes) -> bytes:
    return b"}(" + b"".join(text(k) + v for k, v in items.items()) + b"u"


def storage_record(key: str, numel: int, storage_type: bytes = glob("torch", "FloatStorage")) -> bytes:
    return tup(text("storage"), storage_type, text(key), text("cpu"), num(numel)) + b"Q"  # BINPERSID


def tensor(record: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    hooks = call(glob("collections", "OrderedDict"))
    args = (record, num(offset), tup(*map(num, size)), tup(*map(num, stride)), b"\x89", hooks)
    return call(glob("torch._utils", "_rebuild_tensor_v2"), *args)


def torch_like_zip(
    path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None, byteorder: str = "little"
) -> Path:
    """Zip a pickle the way torch.save lays it out."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


FOUR_FLOATS = np.arange(4, dtype="<f4").tobytes()

# ---- payloads: (global the error must name, pickle body given the marker path) ----


def _touch(marker: str) -> bytes:
    return text(f"touch {marker}")


def _python(marker: str) -> bytes:
    return text(f"open({marker!r}, 'w').close()")


PAYLOADS = {
    "os.system": lambda m: call(glob("os", "system"), _touch(m)),
    "posix.system": lambda m: call(glob("posix", "system"), _touch(m)),
    "builtins.eval": lambda m: call(glob("builtins", "eval"), _python(m)),
    "builtins.exec": lambda m: call(glob("builtins", "exec"), _python(m)),
    "__builtin__.eval": lambda m: call(glob("__builtin__", "eval"), _python(m)),
    "subprocess.check_output": lambda m: call(
        glob("subprocess", "check_output"), lst(text("touch"), text(m))
    ),
    "subprocess.Popen": lambda m: call(glob("subprocess", "Popen"), lst(text("touch"), text(m))),
    "builtins.getattr": lambda m: call(
        call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), text("os")), text("system")),
        _touch(m),
    ),
    # __import__ first: stash the os module in the memo, then fetch os.system from it.
    "builtins.__import__": lambda m: (
        call(glob("builtins", "__import__"), text("os"))
        + b"q\x000"
        + call(call(glob("builtins", "getattr"), b"h\x00", text("system")), _touch(m))
    ),
    "numpy.testing._private.utils.runstring": lambda m: call(
        glob("numpy.testing._private.utils", "runstring"), _python(m), b"}"
    ),
    "torch.storage._load_from_bytes": lambda m: call(glob("torch.storage", "_load_from_bytes"), b"C\x00"),
}


def _as_dict(body: bytes) -> bytes:
    return PROTO2 + dict_of(payload=body) + STOP


@pytest.mark.parametrize("global_name", sorted(PAYLOADS))
def test_hostile_globals_are_refused_and_never_run(tmp_path, global_name):
    marker = tmp_path / "marker"
    data = _as_dict(PAYLOADS[global_name](str(marker)))
    if global_name != "torch.storage._load_from_bytes":  # prove the payload is real
        result = pickle.loads(data)["payload"]
        if isinstance(result, subprocess.Popen):
            result.wait()
        assert marker.exists(), "the payload should work with an unrestricted unpickler"
        marker.unlink()
    path = torch_like_zip(tmp_path / "evil.ckpt", data)
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt: .*'{global_name}'"):
        open_tensors(path)
    assert not marker.exists()


def test_stack_global_protocol_4_is_refused(tmp_path):
    marker = tmp_path / "marker"
    data = b"\x80\x04" + text("os") + text("system") + b"\x93" + tup(_touch(str(marker))) + b"R" + STOP
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="'os.system'"):
        open_tensors(torch_like_zip(tmp_path / "evil.pt", data))
    assert not marker.exists()


class _Evil:
    """__reduce__ makes torch.save itself write a call to os.system into a real checkpoint."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_reduce_trick_inside_legacy_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    torch.save(
        {"w": torch.ones(2), "evil": _Evil(os.system, (f"touch {marker}",))},
        tmp_path / "old.ckpt",
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(CheckpointError, match=r"old\.ckpt: .*'(posix|nt)\.system'"):
        open_tensors(tmp_path / "old.ckpt")
    assert not marker.exists()


def test_reduce_trick_inside_valid_torch_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    checkpoint = {
        "state_dict": {"w": torch.ones(3), "v": torch.zeros(2, 2)},
        "global_step": 1,
        "optimizer_states": [
            {"deep": [1, 2, {"x": _Evil(subprocess.check_output, (["touch", str(marker)],))}]}
        ],
    }
    torch.save(checkpoint, tmp_path / "nested.ckpt")
    torch.load(tmp_path / "nested.ckpt", weights_only=False)
    assert marker.exists(), "torch's unsafe loader runs it: the payload is real"
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"nested\.ckpt: .*'(subprocess|commands)\.check_output'"):
        open_tensors(tmp_path / "nested.ckpt")
    assert not marker.exists()

    torch.save({"w": torch.ones(2), "evil": _Evil(os.system, (f"touch {marker}",))}, tmp_path / "flat.pt")
    with pytest.raises(CheckpointError, match=r"'posix\.system'|'nt\.system'"):
        open_tensors(tmp_path / "flat.pt")
    assert not marker.exists()


def test_placeholder_globals_are_inert(tmp_path):
    """Allowed non-tensor globals get inert stand-ins: calling them with a payload does nothing."""
    marker = tmp_path / "marker"
    lightning = glob("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    body = dict_of(
        w=tensor(storage_record("0", 4), 0, (2, 2), (2, 1)),
        cb=call(lightning, _touch(str(marker)), call(glob("numpy", "dtype"), text("f8"))),
    )
    tf = open_tensors(torch_like_zip(tmp_path / "ok.ckpt", PROTO2 + body + STOP, {"0": FOUR_FLOATS}))
    assert list(tf) == ["w"] and tf["w"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert not marker.exists()


@pytest.mark.parametrize("byteorder", ["big", "little"])
def test_byteorder_record_is_honoured(tmp_path, byteorder):
    """A file written on a big-endian machine says so in <dir>/byteorder; values must come back right."""
    code = ">" if byteorder == "big" else "<"
    storages = {
        "0": np.array([1.5, -2.0, 3.25], dtype=code + "f2").tobytes(),
        "1": np.array([7, -9], dtype=code + "i8").tobytes(),
    }
    body = dict_of(
        h=tensor(storage_record("0", 3, glob("torch", "HalfStorage")), 0, (3,), (1,)),
        i=tensor(storage_record("1", 2, glob("torch", "LongStorage")), 0, (2,), (1,)),
    )
    tf = open_tensors(torch_like_zip(tmp_path / "e.ckpt", PROTO2 + body + STOP, storages, byteorder))
    assert tf["h"].dtype == np.float16 and tf["h"].tolist() == [1.5, -2.0, 3.25]
    assert tf["i"].dtype == np.int64 and tf["i"].tolist() == [7, -9]


def test_single_tensor_file_is_refused(tmp_path):
    torch.save(torch.ones(3), tmp_path / "one.pt")
    with pytest.raises(CheckpointError, match="single tensor"):
        open_tensors(tmp_path / "one.pt")


@pytest.mark.parametrize(
    "target",
    [glob("torch", "FloatStorage"), glob("torch._utils", "_rebuild_tensor_v2"), glob("torch", "float16")],
    ids=["storage-type", "rebuild-function", "dtype"],
)
def test_build_cannot_alter_shared_allow_list_objects(tmp_path, target):
    """BUILD (set attributes) on an allowed global must fail, or one file could poison later loads."""
    for state in (
        dict_of(dtype=text("float64")),
        tup(b"N", dict_of(dtype=text("float64"), __defaults__=tup())),
    ):
        with pytest.raises(CheckpointError, match="not a valid PyTorch checkpoint pickle"):
            open_tensors(torch_like_zip(tmp_path / "poison.ckpt", PROTO2 + target + state + b"b" + STOP))
    body = dict_of(w=tensor(storage_record("0", 4), 0, (4,), (1,)))
    tf = open_tensors(torch_like_zip(tmp_path / "after.ckpt", PROTO2 + body + STOP, {"0": FOUR_FLOATS}))
    assert tf.dtype("w") == np.float32 and tf["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def legacy_file(
    path: Path, main: bytes, storages: list[tuple[str, int, bytes]], keys: list | None = None
) -> Path:
    """A pre-1.6 torch.save layout: magic, version, sys_info, main pickle, key list, raw storages."""
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info)]
    parts += [main, pickle.dumps(keys if keys is not None else [k for k, _, _ in storages], protocol=2)]
    parts += [struct.pack("<q", numel) + data for _, numel, data in storages]
    path.write_bytes(b"".join(parts))
    return path


def legacy_record(key: str, numel: int, view: bytes = b"N") -> bytes:
    return (
        tup(text("storage"), glob("torch", "FloatStorage"), text(key), text("cpu"), num(numel), view) + b"Q"
    )


def test_legacy_storage_views(tmp_path):
    """Old files could name a storage as a slice of another: ('view key', offset, size) in elements."""
    view = legacy_record("0", 4, tup(text("v1"), num(1), num(2)))
    main = (
        PROTO2
        + dict_of(w=tensor(view, 0, (2,), (1,)), all=tensor(legacy_record("0", 4), 0, (4,), (1,)))
        + STOP
    )
    tf = open_tensors(legacy_file(tmp_path / "old.pt", main, [("0", 4, FOUR_FLOATS)]))
    assert tf["w"].tolist() == [1.0, 2.0] and tf["all"].tolist() == [0.0, 1.0, 2.0, 3.0]


BAD_LEGACY = {
    "view past its root": (
        legacy_record("0", 4, tup(text("v"), num(3), num(2))),
        [("0", 4, FOUR_FLOATS)],
        None,
        "reaches past",
    ),
    "size header mismatch": (legacy_record("0", 4), [("0", 3, FOUR_FLOATS)], None, "size header"),
    "key list mismatch": (legacy_record("0", 4), [("0", 4, FOUR_FLOATS)], ["0", "1"], "key list"),
    "key list not strings": (legacy_record("0", 4), [("0", 4, FOUR_FLOATS)], [0], "malformed"),
    "numel beyond file": (legacy_record("0", 2**40), [("0", 4, FOUR_FLOATS)], None, "more bytes than"),
    "data missing": (legacy_record("0", 4), [("0", 4, FOUR_FLOATS[:8])], None, "past the end"),
}


@pytest.mark.parametrize("case", sorted(BAD_LEGACY))
def test_bad_legacy_files(tmp_path, case):
    record, storages, keys, message = BAD_LEGACY[case]
    main = PROTO2 + dict_of(w=tensor(record, 0, (1,), (1,))) + STOP
    with pytest.raises(CheckpointError, match=message):
        open_tensors(legacy_file(tmp_path / "old.pt", main, storages, keys))


def _tensor_file(tmp_path: Path, body: bytes, storages: dict[str, bytes] | None = None) -> Path:
    return torch_like_zip(
        tmp_path / "t.ckpt", PROTO2 + dict_of(w=body) + STOP, storages or {"0": FOUR_FLOATS}
    )


BAD_TENSORS = {
    "past the end": (tensor(storage_record("0", 4), 0, (5,), (1,)), "reaches element"),
    "offset past the end": (tensor(storage_record("0", 4), 3, (2,), (1,)), "reaches element"),
    "huge broadcast": (tensor(storage_record("0", 4), 0, (10**9, 10**9), (0, 0)), "implausibly large"),
    "negative stride": (tensor(storage_record("0", 4), 3, (2,), (-1,)), "non-negative"),
    "size/stride mismatch": (tensor(storage_record("0", 4), 0, (2, 2), (1,)), "differ in length"),
    "float size": (
        tensor(storage_record("0", 4), 0, (), ()).replace(b"(t", b"(G@\x00\x00\x00\x00\x00\x00\x00t", 1),
        "integer",
    ),
    "storage missing": (tensor(storage_record("7", 4), 0, (2,), (1,)), "not in the zip"),
    "path-like key": (tensor(storage_record("../../etc/passwd", 4), 0, (2,), (1,)), "not in the zip"),
    "numel vs member size": (tensor(storage_record("0", 5), 0, (2,), (1,)), "should hold 5"),
    "negative numel": (tensor(storage_record("0", -4), 0, (2,), (1,)), "non-negative"),
    "string storage type": (
        tensor(storage_record("0", 4, text("FloatStorage")), 0, (2,), (1,)),
        "malformed storage",
    ),
    "module record": (
        tup(text("module"), text("x"), text("y"), text("z")) + b"Q",
        "unknown persistent record",
    ),
    "text persistent id": (b"Pfoo\n", "unknown persistent record"),
    "storage twice, two dtypes": (
        lst(
            tensor(storage_record("0", 4), 0, (1,), (1,)),
            tensor(storage_record("0", 8, glob("torch", "HalfStorage")), 0, (1,), (1,)),
        ),
        "declared twice",
    ),
    "BUILD on a tensor": (
        tensor(storage_record("0", 4), 0, (2,), (1,)) + dict_of(shape=num(10**6)) + b"b",
        "not a valid PyTorch checkpoint pickle",
    ),
    "not a storage": (
        call(glob("torch._utils", "_rebuild_tensor_v2"), text("s"), num(0), tup(), tup(), b"\x89", b"N"),
        "storage record",
    ),
    "codecs other encoding": (call(glob("_codecs", "encode"), text("x"), text("rot13")), "latin-1"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensor_and_storage_records(tmp_path, case):
    body, message = BAD_TENSORS[case]
    with pytest.raises(CheckpointError, match=message):
        open_tensors(_tensor_file(tmp_path, body))


@pytest.mark.parametrize(
    "data, message",
    [
        (PROTO2 + b"N" + b"r\xff\xff\xff\x7f" + STOP, "memo index"),  # would resize the memo to 2**31
        (b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc" + STOP, "not a valid"),  # BINBYTES8 of 1 TiB
        (b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + STOP, "not a valid"),  # BINUNICODE8
        (b"\x80\x02" + b"(" * 100_000 + STOP, "not a valid"),
        (b"\x80\x02\x82\x01" + STOP, "EXT1"),  # extension registry lookups are refused
        (b"", "not a valid"),
    ],
)
def test_pickle_resource_bombs_fail_fast(tmp_path, data, message):
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        open_tensors(torch_like_zip(tmp_path / "bomb.ckpt", data))
    assert time.perf_counter() - start < 1.0


def _patch_declared_size(path: Path, member: str, new_size: int) -> None:
    """Overwrite the uncompressed size of `member` in its local and central headers (a lying zip)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    local = data.index(b"PK\x03\x04" + data[4:4])  # first local header
    while data[local + 30 : local + 30 + len(name)] != name:
        local = data.index(b"PK\x03\x04", local + 4)
    struct.pack_into("<I", data, local + 22, new_size)
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, new_size)
    path.write_bytes(bytes(data))


def test_zip_bomb_sizes_are_refused_before_allocating(tmp_path):
    numel = 2**31
    body = (
        PROTO2
        + dict_of(w=tensor(storage_record("0", numel, glob("torch", "ByteStorage")), 0, (4,), (1,)))
        + STOP
    )
    path = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/data/0", b"\x00" * 1000)
    _patch_declared_size(path, "archive/data/0", numel)
    with pytest.raises(CheckpointError, match="impossible compression ratio"):
        open_tensors(path)
    _patch_declared_size(path, "archive/data.pkl", 2**32 - 1)
    with pytest.raises(CheckpointError, match="data.pkl"):
        open_tensors(path)


def test_zip_with_too_many_members_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr("sd.io.torch_zip.MAX_MEMBERS", 3)
    torch.save({"a": torch.ones(1), "b": torch.ones(2)}, tmp_path / "many.ckpt")
    with pytest.raises(CheckpointError, match=r"many\.ckpt: the zip claims \d+ members"):
        open_tensors(tmp_path / "many.ckpt")


def _safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


SIXTEEN = bytes(range(16))
BAD_SAFETENSORS = {
    "header longer than file": (struct.pack("<Q", 2**63) + b"{}", "header claims"),
    "header just past the end": (struct.pack("<Q", 3) + b"{}", "header claims"),
    "bad json": (_safetensors_bytes(b'{"a": [1,'), "not valid JSON"),
    "deep json": (
        _safetensors_bytes(b"{" + b'"a":[' * 50_000 + b"]" * 50_000 + b"}"),
        "not valid JSON|must be",
    ),
    "json list": (_safetensors_bytes(b"[1, 2]"), "not a checkpoint"),
    "not utf-8": (_safetensors_bytes(b'{"\xff": 1}'), "not valid JSON"),
    "duplicate key": (_safetensors_bytes(b'{"a": {}, "a": {}}'), "twice"),
    "unknown dtype": (
        _safetensors_bytes({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, SIXTEEN[:4]),
        "unsupported dtype 'F8_E4M3'",
    ),
    "offsets past data": (
        _safetensors_bytes({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, SIXTEEN),
        "cover 32 bytes of data but the file holds 16",
    ),
    "size mismatch": (
        _safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, SIXTEEN),
        "needs 12 bytes",
    ),
    "overlap": (
        _safetensors_bytes(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            SIXTEEN,
        ),
        "overlaps",
    ),
    "gap": (
        _safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, SIXTEEN),
        "gap",
    ),
    "negative shape": (
        _safetensors_bytes({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, SIXTEEN),
        "'shape'",
    ),
    "bool shape": (
        _safetensors_bytes({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, SIXTEEN[:4]),
        "'shape'",
    ),
    "reversed offsets": (
        _safetensors_bytes({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, SIXTEEN[:4]),
        "data_offsets",
    ),
    "metadata not strings": (_safetensors_bytes({"__metadata__": {"a": 1}}), "__metadata__"),
    "entry not object": (_safetensors_bytes({"a": 5}), "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_bad_safetensors_headers(tmp_path, case):
    data, message = BAD_SAFETENSORS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as caught:
        open_tensors(path)
    assert str(path) in str(caught.value)


# ---- fuzz: seeded mutations of small valid files ----


def _small_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "a.weight": torch.randn(3, 2, generator=g).half(),
        "b.bias": torch.randn(4, generator=g).bfloat16(),
        "c": torch.randn(2, 2, generator=g),
        "d": torch.arange(3),
    }


def _valid_files(tmp_path: Path) -> dict[str, bytes]:
    save_file(_small_tensors(), tmp_path / "v.safetensors", metadata={"k": "v"})
    base = torch.randn(4, 4)
    torch.save(
        {"state_dict": {**_small_tensors(), "view": base.t()[1:, ::2]}, "epoch": 3}, tmp_path / "v.ckpt"
    )
    torch.save(_small_tensors(), tmp_path / "v.pt", _use_new_zipfile_serialization=False)  # legacy
    return {fmt: (tmp_path / f"v.{fmt}").read_bytes() for fmt in ("safetensors", "ckpt", "pt")}


def _mutations(data: bytes, rng: random.Random, count: int, header_end: int):
    for _ in range(count):
        kind = rng.choice(["truncate", "flip", "overwrite", "overwrite"])
        buf = bytearray(data)
        if kind == "truncate":
            yield kind, bytes(buf[: rng.randrange(len(buf))])
            continue
        for _ in range(rng.randint(1, 4)):
            if kind == "flip":
                pos = rng.randrange(len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
            else:  # overwrite bytes in the header / structural part of the file
                pos = rng.randrange(min(header_end, len(buf)))
                buf[pos] = rng.choice([0, 0xFF, ord("{"), ord('"'), ord("9"), rng.randrange(256)])
        yield kind, bytes(buf)


def _load_fully(path: Path) -> None:
    tf = open_tensors(path)
    for name in tf:
        array = tf[name]
        assert array.shape == tf.shape(name) and array.dtype == tf.dtype(name)


def _check_mutant(path: Path, data: bytes, outcomes: dict) -> None:
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        _load_fully(path)
        outcomes["loaded"] += 1
    except CheckpointError as exc:
        assert str(path) in str(exc)
        outcomes["refused"] += 1
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "pt"])
def test_fuzzed_files_load_or_raise_checkpoint_error(tmp_path, fmt):
    data = _valid_files(tmp_path)[fmt]
    header_end = 8 + struct.unpack("<Q", data[:8])[0] if fmt == "safetensors" else len(data)
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "refused": 0}
    for _kind, mutant in _mutations(data, rng, 400, header_end):
        _check_mutant(tmp_path / f"mutant.{fmt}", mutant, outcomes)
    assert outcomes["refused"] > 100  # the mutations do hit the parser


@pytest.mark.slow
def test_fuzzed_pickles_inside_valid_zips(tmp_path):
    """Bit flips in data.pkl itself, re-zipped with a correct CRC, so the unpickler sees them."""
    _valid_files(tmp_path)
    with zipfile.ZipFile(tmp_path / "v.ckpt") as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pkl_name = next(name for name in members if name.endswith("/data.pkl"))
    rng = random.Random(99)
    outcomes = {"loaded": 0, "refused": 0}
    for _kind, mutant in _mutations(members[pkl_name], rng, 600, len(members[pkl_name])):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, content in members.items():
                archive.writestr(name, mutant if name == pkl_name else content)
        _check_mutant(tmp_path / "mutant.ckpt", buffer.getvalue(), outcomes)
    assert outcomes["refused"] > 150
