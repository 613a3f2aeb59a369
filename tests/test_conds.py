"""The denoiser over conditioning entries against a torch transcription of ComfyUI's formulas
(comfy/samplers.py: resolve_areas_and_cond_masks_multidim, calculate_start_end_timesteps,
create_cond_with_same_area_if_none, get_area_and_mult, _calc_cond_batch, cfg_function), on a fake UNet
that is a pure per-pixel function of (x, timestep, context) so both sides compute the same thing."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from comfy_conds_reference import B, C, D, H, L, W, comfy_calc_cond_batch, comfy_denoise, fake_unet_mx

from sd.models.unet_extras import UNetExtras
from sd.sampling.conds import as_entries, resolve
from sd.sampling.guidance import make_denoiser
from sd.sampling.model_sampling import SD1_MODEL_SAMPLING as MS

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


@pytest.mark.slow
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


def test_same_size_areas_share_one_unet_call_with_their_counterparts():
    """Area composition's halves and the negative's same-area counterparts are one batched call per step;
    the full-image entries another (ComfyUI's can_concat_cond: equal crop shapes)."""
    rng = np.random.default_rng(8)
    scene, left, right, negative = (mx.array(_context(rng)) for _ in range(4))
    positive = [(scene, {}), (left, {"area": ("percentage", 1.0, 0.5, 0.0, 0.0)}),
                (right, {"area": ("percentage", 1.0, 0.5, 0.0, 0.5)})]
    pos, neg = resolve([as_entries(positive, 1), as_entries([negative], 1)], (1, 16, 16, 4), MS)
    assert len(neg) == 3  # the negative got a counterpart for each area
    calls = []

    def unet(x, t, context, extras=None):
        calls.append(x.shape)
        return mx.zeros(x.shape)

    make_denoiser(unet, pos, neg, 7.0, MS)(mx.zeros((1, 16, 16, 4)), float(MS.sigmas[500]))
    assert sorted(calls) == [(2, 16, 16, 4), (4, 16, 8, 4)]
