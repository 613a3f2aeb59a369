"""The denoiser over conditioning entries against a torch transcription of ComfyUI's formulas
(comfy/samplers.py: resolve_areas_and_cond_masks_multidim, calculate_start_end_timesteps,
create_cond_with_same_area_if_none, get_area_and_mult, _calc_cond_batch, cfg_function), on a fake UNet
that is a pure per-pixel function of (x, timestep, context) so both sides compute the same thing."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd.models.unet_extras import UNetExtras
from sd.sampling.conds import as_entries, resolve
from sd.sampling.guidance import make_denoiser
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING as MS

B, H, W, C, L, D = 2, 48, 64, 4, 77, 8


# --- the fake UNet, in MLX (NHWC) and torch (NCHW) ---

def fake_unet_mx(x, t, context, extras=None):
    bias = (context.mean(axis=(1, 2)) + context[:, :, 0].max(axis=1))[:, None, None, None]
    out = mx.tanh(x * 0.7 + bias + t[:, None, None, None] / 1000.0)
    if extras is not None and extras.concat is not None:
        out = out + extras.concat.mean(axis=-1, keepdims=True)
    return out


def fake_unet_torch(x, t, context, concat=None):
    bias = (context.mean(dim=(1, 2)) + context[:, :, 0].max(dim=1).values)[:, None, None, None]
    out = torch.tanh(x * 0.7 + bias + t[:, None, None, None] / 1000.0)
    if concat is not None:
        out = out + concat.mean(dim=1, keepdim=True)
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


def comfy_calc_cond_batch(sides, x, sigma, concat_of=None):
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
            eps = fake_unet_torch(x_scaled, timestep, c["cross_attn"], concat)
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


def comfy_denoise(positive, negative, x, sigma, cfg):
    pos, neg = [dict(c) for c in positive], [dict(c) for c in negative]
    comfy_resolve(pos, (H, W))
    comfy_resolve(neg, (H, W))
    for k, kk in ((pos, neg), (neg, pos)):
        for c in k:
            comfy_same_area(kk, c)
    cond, uncond = comfy_calc_cond_batch([pos, None if math.isclose(cfg, 1.0) else neg], x, sigma)
    return uncond + (cond - uncond) * cfg


# --- the comparison ---

def _context(rng, length=L):
    return rng.standard_normal((1, length, D)).astype(np.float32)


def _ours(positive, negative, x_nchw, sigma, cfg):
    def entries(side):
        def value(v):
            return mx.array(v.numpy()) if isinstance(v, torch.Tensor) else v

        return [(mx.array(c["cross_attn"]), {k: value(v) for k, v in c.items() if k != "cross_attn"})
                for c in side]

    x = mx.array(x_nchw.permute(0, 2, 3, 1).numpy())
    pos, neg = resolve([as_entries(entries(positive), B), as_entries(entries(negative), B)], (B, H, W, C), MS)
    out = make_denoiser(fake_unet_mx, pos, neg, cfg, MS)(x, sigma)
    return np.array(out).transpose(0, 3, 1, 2)


def _torch_side(side):
    return [dict(c, cross_attn=torch.from_numpy(np.repeat(c["cross_attn"], B, axis=0))) for c in side]


CASES = {
    "plain": lambda r: ([{}], [{}]),
    "two full entries": lambda r: ([{}, {}], [{}]),
    "strength": lambda r: ([{"strength": 0.6}, {}], [{}]),
    "areas": lambda r: ([{}, {"area": (12, 16, 8, 8), "strength": 1.3}, {"area": (24, 12, 0, 20)}], [{}]),
    "area past the edge": lambda r: ([{}, {"area": (20, 20, 40, 50)}], [{}]),
    "area percentage": lambda r: ([{}, {"area": ("percentage", 0.5, 0.25, 0.25, 0.5)}], [{}]),
    "negative area": lambda r: ([{}], [{}, {"area": (8, 8, 4, 4), "strength": 2.0}]),
    "large area (full fade)": lambda r: ([{}, {"area": (40, 48, 8, 8)}], [{}]),
    "areas on both sides": lambda r: (
        [{}, {"area": (16, 16, 8, 8), "strength": 0.7}, {"area": (8, 40, 40, 0)}],
        [{}, {"area": (32, 32, 0, 0), "strength": 0.5}, {"area": (24, 24, 4, 4)}]),
    "mask": lambda r: ([{}, {"mask": torch.from_numpy(r.random((1, 96, 128), dtype=np.float32)),
                             "mask_strength": 0.8, "strength": 1.5}], [{}]),
    "mask bounds": lambda r: ([{}, {"mask": torch.from_numpy(
        np.pad(r.random((10, 12), dtype=np.float32), ((5, 9), (7, 13)))), "set_area_to_bounds": True}], [{}]),
    "mask per image": lambda r: ([{"mask": torch.from_numpy(r.random((B, H, W), dtype=np.float32))}], [{}]),
    "timestep ranges": lambda r: ([{"start_percent": 0.0, "end_percent": 0.5}, {"start_percent": 0.5}], [{}]),
    "inactive side": lambda r: ([{"start_percent": 0.9}], [{}]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma_index", [999, 500, 40])
def test_denoiser_equals_comfyui_formulas(case, sigma_index):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    positive, negative = CASES[case](rng)
    positive = [dict(c, cross_attn=_context(rng, L if i % 2 == 0 else 2 * L)) for i, c in enumerate(positive)]
    negative = [dict(c, cross_attn=_context(rng)) for c in negative]
    sigma = float(MS.sigmas[sigma_index])
    x = torch.from_numpy(rng.standard_normal((B, C, H, W)).astype(np.float32) * sigma)
    for cfg in (7.5, 1.0):
        want = comfy_denoise(_torch_side(positive), _torch_side(negative), x, sigma, cfg).numpy()
        got = _ours(positive, negative, x, sigma, cfg)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(sigma, 1.0), err_msg=f"cfg {cfg}")


def test_timestep_range_gates_by_sigma():
    """An entry active only in the first half of the schedule is left out at small sigmas (and vice versa)."""
    rng = np.random.default_rng(1)
    early, late = _context(rng), _context(rng)
    positive = [(mx.array(early), {"end_percent": 0.5}), (mx.array(late), {"start_percent": 0.5})]
    pos, neg = resolve([as_entries(positive, 1), as_entries([mx.array(early)], 1)], (1, 8, 8, 4), MS)
    calls = []

    def unet(x, t, context, extras=None):
        calls.append(np.array(context))
        return mx.zeros(x.shape)

    denoiser = make_denoiser(unet, pos, neg, 1.0, MS)
    denoiser(mx.zeros((1, 8, 8, 4)), float(MS.sigmas[-1]))
    assert len(calls) == 1 and np.array_equal(calls[-1], early)
    denoiser(mx.zeros((1, 8, 8, 4)), float(MS.sigmas[10]))
    assert np.array_equal(calls[-1], late)


class ConcatSource:
    """An extras source (as an inpainting model's concat latent would be): its channels cropped per area."""

    def __init__(self, image):
        self.image = image
        self.seen = []

    def unet_extras(self, x, timestep, context, areas):
        crops = [self.image if a is None else self.image[:, a[2] : a[2] + a[0], a[3] : a[3] + a[1]]
                 for a in areas]
        self.seen.append(len(areas))
        per_chunk = x.shape[0] // len(areas)
        return UNetExtras(concat=mx.concatenate([mx.repeat(c, per_chunk, axis=0) for c in crops]))


def test_extras_sources_reach_the_unet_call():
    rng = np.random.default_rng(2)
    image = rng.standard_normal((1, 5, H, W)).astype(np.float32)
    source = ConcatSource(mx.array(image.transpose(0, 2, 3, 1)))
    ctx = _context(rng)
    sigma = float(MS.sigmas[600])
    x = torch.from_numpy(rng.standard_normal((1, C, H, W)).astype(np.float32))
    pos, neg = resolve([as_entries([(mx.array(ctx), {"control": source}),
                                    (mx.array(ctx), {"control": source, "area": (8, 8, 8, 8)})], 1),
                        as_entries([mx.array(ctx)], 1)], (1, H, W, C), MS)
    denoiser = make_denoiser(fake_unet_mx, pos, neg, 1.0, MS)
    got = np.array(denoiser(mx.array(x.permute(0, 2, 3, 1).numpy()), sigma))
    side = [{"cross_attn": torch.from_numpy(ctx), "concat": torch.from_numpy(image)},
            {"cross_attn": torch.from_numpy(ctx), "concat": torch.from_numpy(image), "area": (8, 8, 8, 8)}]
    (want,) = comfy_calc_cond_batch([side], x, sigma)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want.numpy(), rtol=2e-5, atol=2e-5)
    assert source.seen and all(n == 1 for n in source.seen)  # different crop shapes: separate calls
