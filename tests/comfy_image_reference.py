"""Torch transcriptions of ComfyUI's image/latent/mask functions (comfy/utils.py common_upscale, bislerp,
lanczos, repeat_to_batch_size; comfy_extras/nodes_mask.py composite), NCHW as there, for the parity tests.
Written from ComfyUI's formulas; sdgraph's own code (sd/image/) is NHWC numpy and shares nothing with this.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def nchw(x) -> torch.Tensor:
    """NHWC numpy/mx -> NCHW torch float32."""
    return torch.from_numpy(np.array(x, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def repeat_to_batch_size(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] > n:
        return t[:n]
    if t.shape[0] < n:
        return t.repeat([math.ceil(n / t.shape[0])] + [1] * (t.dim() - 1))[:n]
    return t


def _slerp(b1, b2, r):
    c = b1.shape[-1]
    n1, n2 = torch.norm(b1, dim=-1, keepdim=True), torch.norm(b2, dim=-1, keepdim=True)
    u1, u2 = b1 / n1, b2 / n2
    u1[n1.expand(-1, c) == 0.0] = 0.0
    u2[n2.expand(-1, c) == 0.0] = 0.0
    dot = (u1 * u2).sum(1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    res = (torch.sin((1.0 - r.squeeze(1)) * omega) / so).unsqueeze(1) * u1 \
        + (torch.sin(r.squeeze(1) * omega) / so).unsqueeze(1) * u2
    res *= (n1 * (1.0 - r) + n2 * r).expand(-1, c)
    res[dot > 1 - 1e-5] = b1[dot > 1 - 1e-5]
    res[dot < 1e-5 - 1] = (b1 * (1.0 - r) + b2 * r)[dot < 1e-5 - 1]
    return res


def _bilinear_taps(old: int, new: int):
    c1 = torch.arange(old, dtype=torch.float32).reshape((1, 1, 1, -1))
    c1 = F.interpolate(c1, size=(1, new), mode="bilinear")
    ratios = c1 - c1.floor()
    c1 = c1.to(torch.int64)
    c2 = torch.arange(old, dtype=torch.float32).reshape((1, 1, 1, -1)) + 1
    c2[:, :, :, -1] -= 1
    c2 = F.interpolate(c2, size=(1, new), mode="bilinear").to(torch.int64)
    return ratios, c1, c2


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    n, c, h, w = samples.shape
    ratios, c1, c2 = _bilinear_taps(w, width)
    c1, c2 = c1.expand((n, c, h, -1)), c2.expand((n, c, h, -1))
    ratios = ratios.expand((n, 1, h, -1))
    p1 = samples.gather(-1, c1).movedim(1, -1).reshape((-1, c))
    p2 = samples.gather(-1, c2).movedim(1, -1).reshape((-1, c))
    out = _slerp(p1, p2, ratios.movedim(1, -1).reshape((-1, 1))).reshape(n, h, width, c).movedim(-1, 1)
    ratios, c1, c2 = _bilinear_taps(h, height)
    c1 = c1.reshape((1, 1, -1, 1)).expand((n, c, -1, width))
    c2 = c2.reshape((1, 1, -1, 1)).expand((n, c, -1, width))
    ratios = ratios.reshape((1, 1, -1, 1)).expand((n, 1, -1, width))
    p1 = out.gather(-2, c1).movedim(1, -1).reshape((-1, c))
    p2 = out.gather(-2, c2).movedim(1, -1).reshape((-1, c))
    return _slerp(p1, p2, ratios.movedim(1, -1).reshape((-1, 1))).reshape(n, height, width, c).movedim(-1, 1)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    images = [Image.fromarray(np.clip(255.0 * i.movedim(0, -1).numpy(), 0, 255).astype(np.uint8))
              for i in samples]
    images = [i.resize((width, height), resample=Image.Resampling.LANCZOS) for i in images]
    images = [torch.from_numpy(np.array(i).astype(np.float32) / 255.0).movedim(-1, 0) for i in images]
    return torch.stack(images)


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    if crop == "center":
        old_w, old_h = samples.shape[3], samples.shape[2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples[:, :, y:old_h - y, x:old_w - x]
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


def composite(destination, source, x, y, mask=None, multiplier=8, resize_source=False):
    """comfy_extras/nodes_mask.py `composite` (NCHW; mask [B, H, W] or [H, W])."""
    destination = destination.clone()
    if resize_source:
        source = F.interpolate(source, size=(destination.shape[2], destination.shape[3]), mode="bilinear")
    source = repeat_to_batch_size(source, destination.shape[0])
    x = max(-source.shape[3] * multiplier, min(x, destination.shape[3] * multiplier))
    y = max(-source.shape[2] * multiplier, min(y, destination.shape[2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[3], top + source.shape[2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                             size=(source.shape[2], source.shape[3]), mode="bilinear")
        mask = repeat_to_batch_size(mask, source.shape[0])
    visible_w, visible_h = destination.shape[3] - left + min(0, x), destination.shape[2] - top + min(0, y)
    mask = mask[:, :, :visible_h, :visible_w]
    inverse = torch.ones_like(mask) - mask
    src_part = mask * source[:, :, :visible_h, :visible_w]
    dst_part = inverse * destination[:, :, top:bottom, left:right]
    destination[:, :, top:bottom, left:right] = src_part + dst_part
    return destination


def tiled_scale_multidim(samples, function, tile, overlap, upscale_amount, out_channels=3):
    """ComfyUI's comfy/utils.py tiled_scale_multidim (v0.3.64+) for 2-D images, transcribed in torch;
    `tile` is (height, width). The upscale-model and tiled-VAE parity tests share it."""
    dims = 2
    out_shape = [samples.shape[0], out_channels] + [round(a * upscale_amount) for a in samples.shape[2:]]
    output = torch.empty(out_shape)
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(s.shape[d + 2] <= tile[d] for d in range(dims)):
            output[b:b + 1] = function(s)
            continue
        out = torch.zeros([1] + out_shape[1:])
        out_div = torch.zeros([1] + out_shape[1:])
        positions = [range(0, s.shape[d + 2] - overlap, tile[d] - overlap) if s.shape[d + 2] > tile[d]
                     else [0] for d in range(dims)]
        for it in itertools.product(*positions):
            s_in, upscaled = s, []
            for d in range(dims):
                pos = max(0, min(s.shape[d + 2] - overlap, it[d]))
                length = min(tile[d], s.shape[d + 2] - pos)
                s_in = s_in.narrow(d + 2, pos, length)
                upscaled.append(round(pos * upscale_amount))
            ps = function(s_in)
            mask = torch.ones_like(ps)
            for d in range(2, dims + 2):
                feather = round(overlap * upscale_amount)
                if feather >= mask.shape[d]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d, t, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
            o, o_d = out, out_div
            for d in range(dims):
                o = o.narrow(d + 2, upscaled[d], mask.shape[d + 2])
                o_d = o_d.narrow(d + 2, upscaled[d], mask.shape[d + 2])
            o.add_(ps * mask)
            o_d.add_(mask)
        output[b:b + 1] = out / out_div
    return output
