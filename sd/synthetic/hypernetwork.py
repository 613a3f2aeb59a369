"""Random A1111 hypernetworks in the real `.pt` layout, written without torch (tests, `sdgraph demo`).

What A1111's `Hypernetwork.save` pickles with `torch.save`: {width: (k state dict, v state dict), ...,
"layer_structure": [...], "activation_func": ..., "is_layer_norm": ..., ...}, each module's keys
`linear.N.weight` / `linear.N.bias` numbered as its nn.Sequential numbers Linear, activation, LayerNorm.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from sd.synthetic import _PickleWriter


def _normal(rng: np.random.Generator, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def random_modules(widths, layer_structure=(1.0, 2.0, 1.0), activation="relu", layer_norm=False,
                   activate_output=False, seed=0, scale=0.05) -> dict[int, tuple[dict, dict]]:
    """{width: (k, v)} state dicts of float32 arrays, numbered as A1111's HypernetworkModule numbers them."""
    rng = np.random.default_rng(seed)
    out = {}
    for width in widths:
        pair = []
        for _ in range(2):
            state, index = {}, 0
            for i in range(len(layer_structure) - 1):
                n_in, n_out = int(width * layer_structure[i]), int(width * layer_structure[i + 1])
                state[f"linear.{index}.weight"] = _normal(rng, scale, (n_out, n_in))
                state[f"linear.{index}.bias"] = _normal(rng, scale, (n_out,))
                index += 1
                last = i == len(layer_structure) - 2
                if activation != "linear" and (not last or activate_output):
                    index += 1  # the activation: no parameters
                if layer_norm:
                    state[f"linear.{index}.weight"] = 1 + _normal(rng, scale, (n_out,))
                    state[f"linear.{index}.bias"] = _normal(rng, scale, (n_out,))
                    index += 1
            pair.append(state)
        out[int(width)] = (pair[0], pair[1])
    return out


def write_hypernetwork(path: str | Path, modules: dict[int, tuple[dict, dict]], *,
                       layer_structure=(1.0, 2.0, 1.0), activation="relu", layer_norm=False,
                       activate_output=False, use_dropout=False, name="sdgraph-random") -> Path:
    """A PyTorch zip `.pt` (as torch.save writes it) holding an A1111 hypernetwork dict."""
    p = _PickleWriter()
    storages: list[np.ndarray] = []
    p.out += b"}("  # EMPTY_DICT, MARK
    for width, pair in modules.items():
        p.integer(int(width))
        for state in pair:
            p.empty_ordered_dict()
            p.out += b"("
            for key, array in state.items():
                p.string(key)
                p.tensor(str(len(storages)), "FloatStorage", tuple(array.shape))
                storages.append(np.ascontiguousarray(array, dtype="<f4"))
            p.out += b"u"  # SETITEMS
        p.out += b"\x86"  # TUPLE2
    p.string("layer_structure")
    p.out += b"]("
    for value in layer_structure:
        p.out += b"G" + struct.pack(">d", float(value))  # BINFLOAT
    p.out += b"e"  # APPENDS
    for key, value in (("activation_func", activation), ("name", name), ("weight_initialization", "Normal")):
        p.string(key)
        p.string(value)
    for key, value in (("is_layer_norm", layer_norm), ("activate_output", activate_output),
                       ("use_dropout", use_dropout), ("last_layer_dropout", False)):
        p.string(key)
        p.out += b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
    p.string("step")
    p.integer(0)
    p.string("sd_checkpoint")
    p.out += b"N"  # None
    p.out += b"u."  # SETITEMS, STOP
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", bytes(p.out))
        zf.writestr("archive/byteorder", "little")
        for index, array in enumerate(storages):
            zf.writestr(f"archive/data/{index}", array.tobytes())
        zf.writestr("archive/version", "3\n")
    return path
