"""Read a GLIGEN file (ComfyUI's `load_gligen` layout: the pruned `gligen_sd14_textbox_pruned.safetensors`)
into `sd.gligen.Gligen`, sizes from shapes.

Keys: `<block>.transformer_blocks.<d>.fuser.<name>` for each gated self-attention, with `<block>` one of
`input_blocks.<i>.<layer>`, `middle_block.<layer>`, `output_blocks.<i>.<layer>` (an optional
`model.diffusion_model.` prefix is accepted), and `position_net.{null_positive_feature, null_position_feature,
linears.{0,2,4}.{weight,bias}}`. Other keys (a full GLIGEN checkpoint's UNet) are ignored. The fusers are
ordered as the UNet forward meets its transformer blocks (input, middle, output; by block, then depth),
the order ComfyUI's `transformer_index` counts. `.ckpt`/`.pt` files go through the safe unpickler.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from sd.errors import CheckpointError
from sd.gligen.model import POSITION_DIM, GatedSelfAttentionDense, Gligen, PositionNet
from sd.io.checkpoint_io import open_tensors

_PREFIX = "model.diffusion_model."
_FUSER = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.\d+\.transformer_blocks\.(\d+)"
                    r"\.fuser\.(.+)$")
_BLOCK_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


def _module_weights(path: Path, module, arrays: dict[str, np.ndarray], where: str, dtype) -> None:
    """Load `arrays` into `module`, every parameter present with its shape (else an error naming it)."""
    want = dict(tree_flatten(module.parameters()))
    missing = sorted(set(want) - set(arrays))
    if missing:
        raise CheckpointError(path, f"GLIGEN {where} lacks {', '.join(where + '.' + m for m in missing[:4])}")
    for name, param in want.items():
        if tuple(arrays[name].shape) != tuple(param.shape):
            raise CheckpointError(path, f"GLIGEN {where}.{name} has shape {tuple(arrays[name].shape)}, "
                                        f"expected {tuple(param.shape)} (from the other weights' shapes)")
    module.load_weights([(name, mx.array(np.asarray(arrays[name], dtype=np.float32)).astype(dtype))
                         for name in want])


def load_gligen(path: str | Path, dtype: mx.Dtype = mx.float32) -> Gligen:
    path = Path(path)
    tensors = open_tensors(path)
    fusers: dict[tuple, dict[str, str]] = {}
    position: dict[str, str] = {}
    for key in tensors.keys():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name.startswith("position_net."):
            position[name[len("position_net."):]] = key
        elif m := _FUSER.match(name):
            kind = m.group(1) or m.group(3)
            site = (_BLOCK_ORDER[kind], int(m.group(2) or 0), int(m.group(4)))
            fusers.setdefault(site, {})[m.group(5)] = key
    if not fusers or "null_positive_feature" not in position:
        raise CheckpointError(path, "not a GLIGEN file: no '...transformer_blocks.N.fuser.*' and "
                                    "'position_net.*' weights")

    def arrays(keys: dict[str, str]) -> dict[str, np.ndarray]:
        return {name: tensors[key] for name, key in keys.items()}

    net = arrays(position)
    in_dim = net["null_positive_feature"].shape[0]
    if net.get("null_position_feature", np.zeros(0)).shape != (POSITION_DIM,):
        raise CheckpointError(path, f"GLIGEN position_net.null_position_feature should hold {POSITION_DIM} "
                                    "values (8 Fourier frequencies x sin/cos x 4 box corners)")
    if "linears.4.weight" not in net:
        raise CheckpointError(path, "GLIGEN file lacks position_net.linears.4.weight")
    position_net = PositionNet(in_dim, net["linears.4.weight"].shape[0])
    _module_weights(path, position_net, net, "position_net", dtype)

    modules = []
    for site in sorted(fusers):
        weights = arrays(fusers[site])
        where = next(iter(fusers[site].values())).rsplit(".fuser.", 1)[0] + ".fuser"
        if "linear.weight" not in weights or len(weights["linear.weight"].shape) != 2:
            raise CheckpointError(path, f"GLIGEN {where} lacks a 2-D linear.weight")
        query_dim, key_dim = weights["linear.weight"].shape
        if key_dim != position_net.linears[4].weight.shape[0]:
            raise CheckpointError(path, f"GLIGEN {where}.linear takes {key_dim} wide box tokens; the "
                                        f"position net makes {position_net.linears[4].weight.shape[0]}")
        if query_dim % 8:
            raise CheckpointError(path, f"GLIGEN {where} is {query_dim} wide, not a multiple of 8 heads")
        fuser = GatedSelfAttentionDense(query_dim, key_dim)
        _module_weights(path, fuser, weights, where, dtype)
        modules.append(fuser)
    gligen = Gligen(modules, position_net)
    mx.eval(gligen.parameters())
    return gligen


def gligen_key_dim(path: str | Path) -> int:
    """The width of the text features the file's boxes take (its position net's), from the header only;
    a file that is no GLIGEN file fails here."""
    path = Path(path)
    tensors = open_tensors(path)
    keys = list(tensors.keys())
    names = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: k for k in keys}
    if "position_net.null_positive_feature" not in names or not any(_FUSER.match(n) for n in names):
        raise CheckpointError(path, "not a GLIGEN file: no '...transformer_blocks.N.fuser.*' and "
                                    "'position_net.*' weights")
    return tensors.shape(names["position_net.null_positive_feature"])[0]
