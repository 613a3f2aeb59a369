"""Weight deltas of each adapter kind, in fp32 numpy and PyTorch layout (convs O, I, kh, kw).

Scaling follows kohya/LyCORIS/ComfyUI: `alpha / rank` when the file stores an alpha, else 1 (the same as
alpha defaulting to rank). Strength is *not* applied here: it is applied when patches are combined, so one
delta serves every strength.
"""

from __future__ import annotations

import math

import numpy as np

from sd.lora.reader import LoRAModule


def _scale(alpha: float | None, rank: int | None) -> float:
    return alpha / rank if alpha is not None and rank else 1.0


def _tucker(t: np.ndarray, w_b: np.ndarray, w_a: np.ndarray) -> np.ndarray:
    """LyCORIS CP/Tucker rebuild: t (r, r, kh, kw), w_b (r, I), w_a (r, O) -> (O, I, kh, kw)."""
    return np.einsum("ijkl,jr,ip->prkl", t, w_b.reshape(w_b.shape[0], -1), w_a.reshape(w_a.shape[0], -1))


def _lora(t: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    up, down = t["up"], t["down"]
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], rank) * np.float32(_scale(alpha, rank))  # scale the small factor
    if "mid" in t:  # LoCon Tucker: up (O, r, 1, 1), mid (r, r, kh, kw), down (r, I, 1, 1)
        return np.einsum("om,mnkl,ni->oikl", up2, t["mid"], down.reshape(rank, -1))
    # plain / LoCon: down may be a (r, I, kh, kw) conv, up a 1x1 conv
    return (up2 @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])


def _loha(t: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    if "hada_t1" in t:
        m1 = _tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        m2 = _tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    else:  # convs come flattened: (O, I*kh*kw)
        m1 = t["hada_w1_a"] @ t["hada_w1_b"]
        m2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return m1 * m2 * _scale(alpha, t["hada_w1_b"].shape[0])


def _lokr(t: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    rank = None  # only a decomposed factor has a rank; the w2 factor's wins, as in LyCORIS/ComfyUI
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2, rank = _tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]), t["lokr_w2_b"].shape[0]
    else:
        w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2) * _scale(alpha, rank)


_BUILDERS = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": lambda t, alpha: t["diff"]}


def delta_shape(m: LoRAModule) -> tuple[int, ...]:
    """Shape `compute_delta` will return, found from the factor shapes without computing anything."""
    t = m.tensors
    if m.kind == "lora":
        if "mid" in t:
            return (t["up"].shape[0], t["down"].shape[1], *t["mid"].shape[2:])
        return (t["up"].shape[0], *t["down"].shape[1:])
    if m.kind == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    if m.kind == "lokr":
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].shape
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return tuple(t["diff"].shape)


def fits(shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """A delta fits a torch-layout weight if the output dims agree and the rest only differs by reshaping:
    linear deltas on 1x1 convs (SD1.5's proj_in), 1x1-conv deltas on linears, LoHa's flattened conv deltas."""
    return shape[0] == weight_shape[0] and math.prod(shape) == math.prod(weight_shape)


def _dora_per_input(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    return len(scale_shape) >= 2 and scale_shape[0] == 1 and weight_shape[0] != 1 and (
        math.prod(scale_shape) == scale_shape[1] == weight_shape[1])


def dora_scale_fits(m: LoRAModule, weight_shape: tuple[int, ...]) -> bool:
    """A DoRA magnitude vector holds one value per output channel, or (LyCORIS default) per input channel."""
    if m.dora_scale is None:
        return True
    shape = tuple(m.dora_scale.shape)
    per_output = math.prod(shape) == weight_shape[0] and (len(shape) < 2 or shape[0] == weight_shape[0])
    return per_output or _dora_per_input(shape, weight_shape)


def compute_delta(m: LoRAModule, weight_shape: tuple[int, ...]) -> np.ndarray:
    """The scaled weight delta of one adapter, fp32, reshaped to the torch-layout `weight_shape`."""
    return np.asarray(_BUILDERS[m.kind](m.tensors, m.alpha), dtype=np.float32).reshape(weight_shape)


def dora_delta(weight: np.ndarray, delta: np.ndarray, dora_scale: np.ndarray) -> np.ndarray:
    """DoRA: W' = dora_scale * (W + dW) / ||W + dW||; returns W' - W so strength scales it linearly
    (ComfyUI applies strength s as W + s * (W' - W)).

    The norm axis follows the magnitude vector's shape: early LyCORIS DoRA (and `wd_on_out=False`) stores it
    per *input* channel, shape (1, I, 1, 1), norm over all other axes; PEFT's `lora_magnitude_vector` and
    LyCORIS `wd_on_out=True` store it per output channel, shape (O,) or (O, 1, ...), norm over everything
    but axis 0. Both take the norm of W + dW (DoRA paper, PEFT, LyCORIS). ComfyUI's output-axis branch
    normalises by the norm of the *original* W instead; we follow the paper and PEFT there.
    """
    w = weight.astype(np.float32) + delta
    out_ch, in_ch = w.shape[0], w.shape[1]
    scale = dora_scale.astype(np.float32)
    if _dora_per_input(tuple(scale.shape), tuple(w.shape)):
        axes = tuple(a for a in range(w.ndim) if a != 1)
        scale = scale.reshape(1, in_ch, *[1] * (w.ndim - 2))
    else:
        axes = tuple(range(1, w.ndim))
        scale = scale.reshape(out_ch, *[1] * (w.ndim - 1))
    norm = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=axes, keepdims=True)).astype(np.float32)
    return (scale * w / norm - weight).astype(np.float32)


def to_mlx_layout(delta: np.ndarray, mlx_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> MLX layout: conv (O, I, kh, kw) -> (O, kh, kw, I); linears unchanged."""
    if len(mlx_shape) == 4:
        return np.ascontiguousarray(delta.transpose(0, 2, 3, 1))
    return delta.reshape(mlx_shape)
