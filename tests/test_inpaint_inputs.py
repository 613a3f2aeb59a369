"""What the inpainting nodes prepare, against torch transcriptions of ComfyUI's code written here:
VAEEncodeForInpaint's and InpaintModelConditioning's pixels and masks (with the VAE's encode left out: both
sides then hand the same pixels to it), and `BaseModel.concat_cond`'s [mask, masked image] for 9-channel
UNets (from concat entries, from the noise mask alone, and with no mask)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sd.image.inpaint import grow_mask, masked_pixels
from sd.sampling.inpaint import BLANK_INPAINT_LATENT, inpaint_concat, prepare_mask


def comfy_vae_encode_for_inpaint(pixels, mask, grow_mask_by):
    """nodes.py VAEEncodeForInpaint.encode, returning the pixels given to vae.encode and the noise mask."""
    x = (pixels.shape[1] // 8) * 8
    y = (pixels.shape[2] // 8) * 8
    mask = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels.clone()
    if pixels.shape[1] != x or pixels.shape[2] != y:
        x_offset = (pixels.shape[1] % 8) // 2
        y_offset = (pixels.shape[2] % 8) // 2
        pixels = pixels[:, x_offset:x + x_offset, y_offset:y + y_offset, :]
        mask = mask[:, :, x_offset:x + x_offset, y_offset:y + y_offset]
    if grow_mask_by == 0:
        mask_erosion = mask
    else:
        kernel_tensor = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        padding = math.ceil((grow_mask_by - 1) / 2)
        mask_erosion = torch.clamp(F.conv2d(mask.round(), kernel_tensor, padding=padding), 0, 1)
    m = (1.0 - mask.round()).squeeze(1)
    for i in range(3):
        pixels[:, :, :, i] -= 0.5
        pixels[:, :, :, i] *= m
        pixels[:, :, :, i] += 0.5
    return pixels, mask_erosion[:, :, :x, :y].round(), mask


@pytest.mark.parametrize("grow", [0, 1, 5, 6])
@pytest.mark.parametrize("size", [(40, 56), (43, 61)])
def test_vae_encode_for_inpaint_pixels_and_mask(grow, size):
    rng = np.random.default_rng(grow)
    h, w = size
    pixels = rng.random((2, h, w, 3)).astype(np.float32)
    mask = (rng.random((1, 20, 28)) ** 3).astype(np.float32)  # another size: resized bilinearly
    ref_pixels, ref_noise_mask, ref_mask = comfy_vae_encode_for_inpaint(torch.from_numpy(pixels),
                                                                        torch.from_numpy(mask), grow)
    filled, m = masked_pixels(mx.array(pixels), mx.array(mask))
    np.testing.assert_allclose(np.array(filled), ref_pixels.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(m), ref_mask.numpy()[:, 0], atol=1e-5)  # InpaintModelConditioning's
    grown = np.array(grow_mask(m, grow))
    np.testing.assert_array_equal(grown, ref_noise_mask.numpy()[:, 0])
    if grow > 1:
        assert grown.sum() > np.round(np.array(m)).sum()


def comfy_concat_cond(noise, latent_image, denoise_mask, concat_latent_image=None, concat_mask=None):
    """model_base.BaseModel.concat_cond with concat_keys ("mask", "masked_image"), SD1.x (NCHW); the
    latent_image it gets is already scaled (process_latent_in), concat_latent_image is not."""
    def common_upscale(s, width, height):  # "bilinear", crop "center"
        old_width, old_height = s.shape[-1], s.shape[-2]
        old_aspect, new_aspect = old_width / old_height, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        s = s.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)
        return F.interpolate(s, size=(height, width), mode="bilinear")

    def resize_to_batch_size(t, batch_size):
        if t.shape[0] == batch_size:
            return t
        return t.repeat((math.ceil(batch_size / t.shape[0]),) + (1,) * (t.ndim - 1))[:batch_size]

    mask = concat_mask if concat_mask is not None else denoise_mask
    if concat_latent_image is None:
        concat_latent_image = latent_image
    else:
        concat_latent_image = concat_latent_image * 0.18215
    if concat_latent_image.shape[1:] != noise.shape[1:]:
        concat_latent_image = common_upscale(concat_latent_image, noise.shape[-1], noise.shape[-2])
    concat_latent_image = resize_to_batch_size(concat_latent_image, noise.shape[0])
    if mask is not None:
        if len(mask.shape) == len(noise.shape):
            mask = mask[:, :1]
        mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
        if mask.shape[-2:] != noise.shape[-2:]:
            mask = common_upscale(mask, noise.shape[-1], noise.shape[-2])
        mask = resize_to_batch_size(mask.round(), noise.shape[0])
        return torch.cat([mask, concat_latent_image], dim=1)
    blank = torch.ones_like(noise)
    for i, v in enumerate(BLANK_INPAINT_LATENT):
        blank[:, i] *= v
    return torch.cat([torch.ones_like(noise)[:, :1], blank], dim=1)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.array(a).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("case", ["entries", "entries_other_aspect", "noise_mask_only", "no_mask"])
def test_inpaint_concat_equals_comfyui(case):
    rng = np.random.default_rng(3)
    shape = (2, 6, 8, 4)
    latent = rng.standard_normal(shape).astype(np.float32) * 0.18215
    noise_mask = rng.random((1, 48, 64)).astype(np.float32)
    denoise = prepare_mask(mx.array(noise_mask), shape) if case != "no_mask" else None
    image = mask = None
    if case.startswith("entries"):
        hw = (6, 8) if case == "entries" else (7, 8)
        image = rng.standard_normal((1, *hw, 4)).astype(np.float32)
        mask = rng.random((1, hw[0] * 8, hw[1] * 8)).astype(np.float32)
    ours = inpaint_concat(shape, mx.array(latent), denoise, None if image is None else mx.array(image),
                          None if mask is None else mx.array(mask))
    ref = comfy_concat_cond(torch.zeros(2, 4, 6, 8), _nchw(latent),
                            None if denoise is None else _nchw(denoise),
                            None if image is None else _nchw(image),
                            None if mask is None else torch.from_numpy(mask)[:, None])
    np.testing.assert_allclose(np.array(ours).transpose(0, 3, 1, 2), ref.numpy(), atol=1e-6)


def test_concat_source_crops_to_each_chunks_area():
    from sd.sampling.inpaint import ConcatSource

    concat = mx.array(np.arange(2 * 4 * 6 * 5, dtype=np.float32).reshape(2, 4, 6, 5))
    source = ConcatSource(concat)
    x = mx.zeros((4, 2, 3, 4))  # two chunks of batch 2, each cropped to a 2x3 area
    extras = source.unet_extras(x, None, None, [(2, 3, 1, 2), (2, 3, 0, 0)])
    expected = np.concatenate([np.array(concat)[:, 1:3, 2:5], np.array(concat)[:, 0:2, 0:3]])
    np.testing.assert_array_equal(np.array(extras.concat), expected)
    whole = source.unet_extras(mx.zeros((2, 4, 6, 4)), None, None, [None])
    np.testing.assert_array_equal(np.array(whole.concat), np.array(concat))


@pytest.mark.parametrize("sizes", [((24, 32), (43, 61)), ((100, 70), (33, 200)), ((64, 64), (43, 61)),
                                   ((512, 384), (64, 48)), ((20, 28), (640, 448))])
def test_bilinear_rounds_binary_masks_as_torch(sizes):
    """Resized binary masks land on 0.5 exactly in many places; rounding them must go torch's way."""
    from sd.image.bilinear import bilinear

    (h, w), (nh, nw) = sizes
    m = (np.random.default_rng(h).random((2, h, w)) > 0.5).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(m)[:, None], size=(nh, nw), mode="bilinear")[:, 0].numpy()
    ours = bilinear(m[..., None], nh, nw)[..., 0]
    assert np.abs(ours - ref).max() <= 2.5e-7
    np.testing.assert_array_equal(np.round(ours), np.round(ref))
