"""A torch transcription of ComfyUI's conditioning maths (comfy/samplers.py:
resolve_areas_and_cond_masks_multidim, calculate_start_end_timesteps, create_cond_with_same_area_if_none,
get_area_and_mult, _calc_cond_batch, cfg_function) and a fake UNet in MLX and torch: a pure per-pixel
function of (x, timestep, context), with optional reactions to extras, so both sides compute the same."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import torch

from sd.sampling.model_sampling import SD1_MODEL_SAMPLING as MS

B, H, W, C, L, D = 2, 48, 64, 4, 77, 8  # latent batch, height, width, channels; tokens, context width

# --- the fake UNet, in MLX (NHWC) and torch (NCHW) ---

def fake_unet_mx(x, t, context, extras=None):
    bias = (context.mean(axis=(1, 2)) + context[:, :, 0].max(axis=1))[:, None, None, None]
    out = mx.tanh(x * 0.7 + bias + t[:, None, None, None] / 1000.0)
    if extras is not None and extras.concat is not None:
        out = out + extras.concat.mean(axis=-1, keepdims=True)
    if extras is not None and ("middle", 0) in extras.attn1_replace:  # "perturbed attention"
        out = out * 0.5
    return out


def fake_unet_torch(x, t, context, concat=None, perturbed=False):
    bias = (context.mean(dim=(1, 2)) + context[:, :, 0].max(dim=1).values)[:, None, None, None]
    out = torch.tanh(x * 0.7 + bias + t[:, None, None, None] / 1000.0)
    if concat is not None:
        out = out + concat.mean(dim=1, keepdim=True)
    if perturbed:
        out = out * 0.5
    return out


# --- a transcription of ComfyUI's formulas (torch, NCHW, dict conds) ---

def percent_to_sigma(percent):
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    t = torch.tensor((1.0 - percent) * 999.0, dtype=torch.float32)
    log_sigmas = torch.tensor(MS.log_sigmas)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().item()


def comfy_resolve(conds, dims):
    for i, c in enumerate(conds):
        if "area" in c and c["area"][0] == "percentage":
            a = c["area"][1:]
            c = dict(c, area=(max(1, round(a[0] * dims[0])), max(1, round(a[1] * dims[1])),
                              round(a[2] * dims[0]), round(a[3] * dims[1])))
        if "mask" in c:
            mask = c["mask"]
            if mask.ndim == 2:
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[1:]) != dims:
                mask = torch.nn.functional.interpolate(mask.unsqueeze(1), size=dims, mode="bilinear",
                                                       align_corners=False).squeeze(1)
            c = dict(c, mask=mask)
            if c.get("set_area_to_bounds", False):
                bounds = torch.max(torch.abs(mask), dim=0).values
                y, x = torch.where(bounds)
                hh, ww = int(y.max() - y.min() + 1), int(x.max() - x.min() + 1)
                c["area"] = (max(8, hh), max(8, ww), int(y.min()), int(x.min()))
        if "start_percent" in c:
            c = dict(c, timestep_start=percent_to_sigma(c["start_percent"]))
        if "end_percent" in c:
            c = dict(c, timestep_end=percent_to_sigma(c["end_percent"]))
        conds[i] = c


def comfy_same_area(conds, c):
    if "area" not in c:
        return

    def inside(a, cmp):
        return (a[2] >= cmp[2] and a[3] >= cmp[3] and a[0] + a[2] <= cmp[0] + cmp[2]
                and a[1] + a[3] <= cmp[1] + cmp[3])

    smallest = None
    for x in conds:
        if "area" in x:
            if inside(c["area"], x["area"]):
                if smallest is None or "area" not in smallest:
                    smallest = x
                elif math.prod(smallest["area"][:2]) > math.prod(x["area"][:2]):
                    smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or smallest.get("area") == c["area"]:
        return
    conds.append(dict(c, cross_attn=smallest["cross_attn"]))


def comfy_area_and_mult(conds, x_in, sigma):
    area, strength = None, conds.get("strength", 1.0)
    if "timestep_start" in conds and sigma > conds["timestep_start"]:
        return None
    if "timestep_end" in conds and sigma < conds["timestep_end"]:
        return None
    if "area" in conds:
        area = list(conds["area"])
    input_x = x_in
    if area is not None:
        for i in range(2):
            area[i] = min(input_x.shape[i + 2] - area[2 + i], area[i])
            input_x = input_x.narrow(i + 2, area[2 + i], area[i])
    if "mask" in conds:
        mask = conds["mask"][: input_x.shape[0]]
        if area is not None:
            for i in range(2):
                mask = mask.narrow(i + 1, area[2 + i], area[i])
        mask = mask * conds.get("mask_strength", 1.0)
        mask = mask.unsqueeze(1).repeat(input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1)
    else:
        mask = torch.ones_like(input_x)
    mult = mask * strength
    if "mask" not in conds and area is not None:
        for i in range(2):
            rr = min(8, mult.shape[2 + i] // 4)
            if area[2 + i] != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if area[i] + area[2 + i] < x_in.shape[i + 2]:
                for t in range(rr):
                    mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return input_x, mult, area


def comfy_calc_cond_batch(sides, x, sigma, perturbed=False):
    """Denoised per side: each entry separately (batching does not change the maths)."""
    timestep = torch.tensor([float(MS.timestep(np.float32(sigma)))] * x.shape[0])
    outs = []
    for side in sides:
        out, count = torch.zeros_like(x), torch.ones_like(x) * 1e-37
        for c in side or []:
            p = comfy_area_and_mult(c, x, sigma)
            if p is None:
                continue
            input_x, mult, area = p
            x_scaled = input_x / math.sqrt(sigma**2 + 1.0)  # EPS calculate_input
            concat = None
            if "concat" in c:
                concat = c["concat"]
                if area is not None:
                    concat = concat[:, :, area[2] : area[2] + area[0], area[3] : area[3] + area[1]]
            eps = fake_unet_torch(x_scaled, timestep, c["cross_attn"], concat, perturbed)
            denoised = input_x - eps * sigma
            if area is None:
                out += denoised * mult
                count += mult
            else:
                sl = (slice(None), slice(None), slice(area[2], area[2] + area[0]),
                      slice(area[3], area[3] + area[1]))
                out[sl] += denoised * mult
                count[sl] += mult
        outs.append(out / count)
    return outs


def comfy_process(sides):
    """process_conds for sides given in ComfyUI's dict order: resolved, same-area counterparts added."""
    sides = [[dict(c) for c in side] for side in sides]
    for side in sides:
        comfy_resolve(side, (H, W))
    for k, side in enumerate(sides):
        for c in side:
            for kk, other in enumerate(sides):
                if kk != k:
                    comfy_same_area(other, c)
    return sides


def comfy_denoise(positive, negative, x, sigma, cfg):
    pos, neg = comfy_process([positive, negative])
    cond, uncond = comfy_calc_cond_batch([pos, None if math.isclose(cfg, 1.0) else neg], x, sigma)
    return uncond + (cond - uncond) * cfg
