"""Random-weight SD1.x checkpoints in the real LDM single-file layout, for tests, `doctor` and benchmarks.

`make_checkpoint` writes `.safetensors` or PyTorch-zip `.ckpt` files without torch: both writers are
here, and stream one tensor at a time so a full-size (~4 GB fp32) file never sits in memory at once.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
}
PARTS = tuple(PREFIXES)
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its full key, PyTorch shape, and a function producing float32/int64 data."""

    key: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    integer: bool = False


def _configs(size: str) -> dict:
    from sd.synthetic import clip, unet, vae

    if size == "tiny":
        return {"unet": unet.TINY_UNET, "vae": vae.TINY_VAE, "clip": clip.TINY_CLIP}
    if size == "tiny-inpainting":  # 9 input channels: latent + mask + masked image
        return {"unet": replace(unet.TINY_UNET, in_channels=9), "vae": vae.TINY_VAE, "clip": clip.TINY_CLIP}
    if size == "full":
        return {"unet": unet.SD15_UNET, "vae": vae.SD15_VAE, "clip": clip.SD15_CLIP}
    if size == "full-inpainting":  # sd-v1-5-inpainting's shapes (benchmarks)
        return {"unet": replace(unet.SD15_UNET, in_channels=9), "vae": vae.SD15_VAE, "clip": clip.SD15_CLIP}
    raise ValueError(f"unknown size {size!r}; use 'tiny', 'tiny-inpainting', 'full' or 'full-inpainting'")


def _part_rng(seed: int, part: str) -> np.random.Generator:
    # one stream per part: a UNet-only file holds the same UNet as a complete one with the same seed
    return np.random.default_rng([seed, PARTS.index(part)])


def checkpoint_specs(size: str = "tiny", seed: int = 0, parts: Iterable[str] = PARTS) -> list[TensorSpec]:
    """What `make_checkpoint` writes, in order. UNet tensors are produced lazily (in this order)."""
    from sd.synthetic.clip import random_clip_weights
    from sd.synthetic.unet import random_tensor, unet_shapes
    from sd.synthetic.vae import random_vae_weights

    configs, specs = _configs(size), []
    for part in parts:
        if part not in PREFIXES:
            raise ValueError(f"unknown part {part!r}; use some of {PARTS}")
        rng, prefix = _part_rng(seed, part), PREFIXES[part]
        if part == "unet":
            for key, shape in unet_shapes(configs["unet"]).items():
                specs.append(TensorSpec(prefix + key, shape,
                                        lambda k=key, s=shape, r=rng: random_tensor(k, s, r)))
            continue
        weights = (random_vae_weights if part == "vae" else random_clip_weights)(configs[part], rng)
        for key, array in weights.items():
            specs.append(TensorSpec(prefix + key, array.shape, lambda a=array: a))
        if part == "clip":  # real files carry this int64 buffer; loaders must ignore it
            positions = configs["clip"].max_positions
            specs.append(TensorSpec(POSITION_IDS_KEY, (1, positions),
                                    lambda n=positions: np.arange(n, dtype=np.int64)[None], integer=True))
    return specs


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as PyTorch does."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _encode(spec: TensorSpec, dtype: str) -> bytes:
    """The tensor's little-endian bytes in the file's element type (integers keep int64)."""
    array = spec.produce()
    if spec.integer:
        return np.ascontiguousarray(array, dtype="<i8").tobytes()
    if dtype == "bfloat16":
        return to_bfloat16_bits(array).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype="<f4" if dtype == "float32" else "<f2").tobytes()


def _element(spec: TensorSpec, dtype: str) -> tuple[str, int]:
    """(safetensors dtype tag, bytes per element)."""
    if spec.integer:
        return "I64", 8
    return {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}[dtype]


def write_safetensors(path: Path, specs: list[TensorSpec], dtype: str) -> None:
    header, offset = {}, 0
    for spec in specs:
        tag, size = _element(spec, dtype)
        nbytes = size * int(np.prod(spec.shape, dtype=np.int64))
        header[spec.key] = {"dtype": tag, "shape": list(spec.shape),
                            "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "sdgraph": "synthetic random weights"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format recommends 8-byte aligned data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for spec in specs:
            f.write(_encode(spec, dtype))


class _PickleWriter:
    """Emits the few pickle (protocol 2) opcodes a PyTorch state dict needs, by hand: nothing to import."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def string(self, text: str) -> None:
        data = text.encode()
        self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

    def integer(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])  # BININT1
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)  # BININT
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data  # LONG1

    def int_tuple(self, values: tuple[int, ...]) -> None:
        self.out += b"("  # MARK
        for v in values:
            self.integer(v)
        self.out += b"t"  # TUPLE

    def empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE

    def tensor(self, storage_key: str, storage_type: str, shape: tuple[int, ...]) -> None:
        """torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()), the storage a
        persistent id ('storage', torch.<Type>Storage, key, 'cpu', numel) whose data is `data/<key>`."""
        numel = int(np.prod(shape, dtype=np.int64))
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("  # MARK args, MARK persistent id
        self.string("storage")
        self.global_("torch", storage_type)
        self.string(storage_key)
        self.string("cpu")
        self.integer(numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.integer(0)  # storage offset
        self.int_tuple(shape)
        self.int_tuple(strides)
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.empty_ordered_dict()  # backward hooks
        self.out += b"tR"  # TUPLE, REDUCE


_STORAGE_TYPES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                  "int64": "LongStorage"}


def _state_dict_pickle(specs: list[TensorSpec], dtype: str) -> bytes:
    """OrderedDict{key: torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())}
    with each storage a persistent id ('storage', torch.<Type>Storage, '<n>', 'cpu', numel)."""
    p = _PickleWriter()
    p.empty_ordered_dict()
    p.out += b"("  # MARK: the items follow, closed by SETITEMS
    for index, spec in enumerate(specs):
        p.string(spec.key)
        p.tensor(str(index), _STORAGE_TYPES["int64" if spec.integer else dtype], spec.shape)
    p.out += b"u."  # SETITEMS, STOP
    return bytes(p.out)


def write_torch_zip(path: Path, specs: list[TensorSpec], dtype: str) -> None:
    """PyTorch's zip serialisation (as `torch.save` writes since 1.6), members stored uncompressed."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr("archive/data.pkl", _state_dict_pickle(specs, dtype))
        zf.writestr("archive/byteorder", "little")
        for index, spec in enumerate(specs):
            zf.writestr(f"archive/data/{index}", _encode(spec, dtype))
        zf.writestr("archive/version", "3\n")


def make_checkpoint(
    path: str | Path,
    size: str = "tiny",
    fmt: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    parts: Iterable[str] = PARTS,
) -> Path:
    """Write a random-weight SD1.x checkpoint (`size` "tiny", "tiny-inpainting" or "full") in the LDM layout.

    `fmt` is "safetensors" or "ckpt" (default: from the file suffix); `dtype` one of float32,
    float16, bfloat16; `parts` any of "unet", "vae", "clip". Same seed, same weights in every format.
    """
    path = Path(path)
    fmt = fmt or ("ckpt" if path.suffix in (".ckpt", ".pt", ".pth") else "safetensors")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {_FLOAT_DTYPES}")
    specs = checkpoint_specs(size, seed, tuple(parts))
    if fmt == "safetensors":
        write_safetensors(path, specs, dtype)
    elif fmt == "ckpt":
        write_torch_zip(path, specs, dtype)
    else:
        raise ValueError(f"unknown format {fmt!r}; use 'safetensors' or 'ckpt'")
    return path

