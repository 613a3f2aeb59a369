"""Random-weight upscale models in the key layouts real files use, for tests, `sdgraph demo` and benchmarks.

    state = esrgan_state("old", scale=4, num_feat=16, num_blocks=1)   # {key: float32 array, PyTorch layout}
    write_upscale_model(path, state)                                  # .pth (PyTorch zip) or .safetensors

Layouts: "old" (ESRGAN: model.0, model.1.sub.N.RDBk.convj.0, ...), "new" (Real-ESRGAN / BasicSR: conv_first,
body.N.rdbk.convj, conv_body, conv_upN, conv_hr, conv_last), "bsrgan" (RRDB_trunk, trunk_conv, upconvN,
HRconv). Real-ESRGAN's x2 and x1 models (pixel-unshuffle by 2 / 4, then two x2 upsamplings) come from
`unshuffle=2` / `4`. Weights are scaled so that activations stay of order one through the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd.synthetic import TensorSpec, write_safetensors, write_torch_zip


def _conv(rng: np.random.Generator, cout: int, cin: int, gain: float = 1.0) -> dict[str, np.ndarray]:
    std = gain / np.sqrt(cin * 9)
    return {"weight": (std * rng.standard_normal((cout, cin, 3, 3))).astype(np.float32),
            "bias": (0.02 * rng.standard_normal(cout)).astype(np.float32)}


def _new_layout(rng, in_ch, out_ch, nf, gc, nb, ups) -> dict[str, dict[str, np.ndarray]]:
    layers = {"conv_first": _conv(rng, nf, in_ch)}
    for b in range(nb):
        for r in (1, 2, 3):
            for j in range(1, 6):
                cin, cout = nf + (j - 1) * gc, (gc if j < 5 else nf)
                layers[f"body.{b}.rdb{r}.conv{j}"] = _conv(rng, cout, cin)
    layers["conv_body"] = _conv(rng, nf, nf)
    for i in range(1, ups + 1):
        layers[f"conv_up{i}"] = _conv(rng, nf, nf)
    layers["conv_hr"] = _conv(rng, nf, nf)
    layers["conv_last"] = _conv(rng, out_ch, nf, gain=0.5)
    layers["conv_last"]["bias"] += 0.5  # outputs around mid-grey, so little is clamped to [0, 1]
    return layers


def _old_name(name: str, nb: int, ups: int) -> str:
    if name == "conv_first":
        return "model.0"
    if name == "conv_body":
        return f"model.1.sub.{nb}"
    if name.startswith("body."):
        _, b, rdb, conv = name.split(".")
        return f"model.1.sub.{b}.RDB{rdb[3:]}.{conv}.0"
    if name.startswith("conv_up"):
        return f"model.{3 * int(name[7:])}"
    return {"conv_hr": f"model.{3 * ups + 2}", "conv_last": f"model.{3 * ups + 4}"}[name]


def _bsrgan_name(name: str) -> str:
    if name.startswith("body."):
        _, b, rdb, conv = name.split(".")
        return f"RRDB_trunk.{b}.RDB{rdb[3:]}.{conv}"
    if name.startswith("conv_up"):
        return "upconv" + name[7:]
    return {"conv_body": "trunk_conv", "conv_hr": "HRconv"}.get(name, name)


def esrgan_state(layout: str = "old", scale: int = 4, num_feat: int = 16, num_blocks: int = 1,
                 num_grow: int = 32, channels: int = 3, unshuffle: int = 1,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """An RRDBNet state dict. `scale` 1/2/4/8 with `unshuffle=1` (log2(scale) upsamplings); with
    `unshuffle` 2 or 4 the net upsamples twice (Real-ESRGAN x2plus / x1), so scale = 4 // unshuffle."""
    if unshuffle > 1:
        ups, scale = 2, 4 // unshuffle
    else:
        ups = int(np.log2(scale))
        if 2 ** ups != scale:
            raise ValueError(f"scale {scale} is not a power of two")
    rng = np.random.default_rng(seed)
    layers = _new_layout(rng, channels * unshuffle**2, channels, num_feat, num_grow, num_blocks, ups)
    renames = {"old": lambda n: _old_name(n, num_blocks, ups), "new": lambda n: n, "bsrgan": _bsrgan_name}
    rename = renames[layout]
    return {f"{rename(name)}.{kind}": a for name, parts in layers.items() for kind, a in parts.items()}


def compact_state(scale: int = 4, num_feat: int = 16, num_conv: int = 2, channels: int = 3,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """An SRVGGNetCompact state dict (PReLU activations, as the released models)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    index = 0
    for i in range(num_conv + 1):
        for kind, array in _conv(rng, num_feat, channels if i == 0 else num_feat).items():
            state[f"body.{index}.{kind}"] = array
        state[f"body.{index + 1}.weight"] = rng.uniform(0.05, 0.4, num_feat).astype(np.float32)
        index += 2
    for kind, array in _conv(rng, channels * scale * scale, num_feat, gain=0.3).items():
        state[f"body.{index}.{kind}"] = array
    return state


def write_upscale_model(path: str | Path, state: dict[str, np.ndarray], dtype: str = "float32") -> Path:
    """A plain state dict as `.safetensors` or, for any other suffix, a PyTorch zip (`.pth`); no torch."""
    path = Path(path)
    specs = [TensorSpec(k, tuple(v.shape), (lambda v=v: v)) for k, v in state.items()]
    if path.suffix == ".safetensors":
        write_safetensors(path, specs, dtype)
    else:
        write_torch_zip(path, specs, dtype)
    return path
