"""VAELoader's files: every layout found in the wild (LDM keys bare or with 'first_stage_model.', diffusers
AutoencoderKL with new and old attention names, linear or 1x1-conv attention weights; .safetensors and .ckpt
with a state_dict wrapper and training leftovers) loads to a VAE whose encode and decode equal diffusers'
AutoencoderKL built from the same random weights (fp32, 1e-4); files that are no SD VAE are refused
clearly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import diffusers_vae
from safetensors.numpy import save_file

from sd.errors import ArchitectureError, CheckpointError
from sd.loading.vae_file import load_vae_file, vae_layout
from sd.synthetic.vae import TINY_VAE, random_vae_weights

TOLERANCE = 1e-4
_OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def weights():
    return random_vae_weights(TINY_VAE, np.random.default_rng(11))


@pytest.fixture(scope="module")
def reference(weights):
    return diffusers_vae(TINY_VAE, {k: torch.from_numpy(v) for k, v in weights.items()})


def _diffusers_state(reference, old_names: bool, conv_attn: bool) -> dict[str, np.ndarray]:
    out = {}
    for key, value in reference.state_dict().items():
        array = value.numpy().copy()
        if ".mid_block.attentions.0." in key:
            if old_names:
                for new, old in _OLD_ATTN.items():
                    key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            if conv_attn and array.ndim == 2:
                array = array[:, :, None, None]
        out[key] = array
    return out


def _linear_attention(weights: dict) -> dict:
    return {k: (v[:, :, 0, 0] if ".attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight",
                                                                 "proj_out.weight")) else v)
            for k, v in weights.items()}


def _write(path, tensors: dict[str, np.ndarray], wrapped: bool = False):
    if path.suffix == ".safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    else:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        torch.save({"state_dict": state, "global_step": 3} if wrapped else state, path)
    return path


LEFTOVERS = {"model_ema.decay": np.array(0.9999, np.float32), "loss.logvar": np.zeros((), np.float32),
             "loss.discriminator.main.0.weight": np.ones((2, 3, 4, 4), np.float32)}
LAYOUTS = {
    # name: (file name, expected layout, tensors from (weights, reference), wrapped in state_dict)
    "ldm": ("vae.safetensors", "ldm", lambda w, r: w, False),
    "ldm-ckpt-with-leftovers": ("vae-ft-mse.ckpt", "ldm", lambda w, r: w | LEFTOVERS, True),
    "ldm-prefixed": ("vae.pt", "ldm-prefixed",
                     lambda w, r: {f"first_stage_model.{k}": v for k, v in w.items()}, False),
    "ldm-linear-attention": ("vae_linear.safetensors", "ldm", lambda w, r: _linear_attention(w), False),
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusers",
                  lambda w, r: _diffusers_state(r, old_names=False, conv_attn=False), False),
    "diffusers-old-names-conv": ("diffusers_old.safetensors", "diffusers",
                                 lambda w, r: _diffusers_state(r, old_names=True, conv_attn=True), False),
}


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_encodes_and_decodes_like_diffusers(layout, weights, reference, tmp_path):
    name, expected, make, wrapped = LAYOUTS[layout]
    path = _write(tmp_path / name, make(weights, reference), wrapped)
    assert vae_layout(path) == expected
    ours = load_vae_file(path, dtype="float32")
    assert ours.config == TINY_VAE
    latent = np.random.default_rng(5).standard_normal((1, 4, 5, 4)).astype(np.float32)
    image = np.random.default_rng(6).uniform(-1, 1, (1, 3, 40, 32)).astype(np.float32)
    with torch.no_grad():
        want_image = reference.decode(torch.from_numpy(latent)).sample.numpy()
        want_latent = reference.encode(torch.from_numpy(image)).latent_dist.mode().numpy()
    got_image = np.array(ours.decode(mx.array(latent.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    got_latent = np.array(ours.encode(mx.array(image.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert _max_rel(got_image, want_image) <= TOLERANCE
    assert _max_rel(got_latent, want_latent) <= TOLERANCE


def test_a_swapped_decoder_level_is_caught(weights, reference, tmp_path):
    """The diffusers up_blocks order is reversed against LDM's up.N: getting it wrong must fail the shapes."""
    state = _diffusers_state(reference, old_names=False, conv_attn=False)
    swapped = {k.replace("up_blocks.0.", "up_blocks.X.").replace("up_blocks.3.", "up_blocks.0.")
               .replace("up_blocks.X.", "up_blocks.3."): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_vae_file(_write(tmp_path / "bad.safetensors", swapped), dtype="float32")


def test_unknown_keys_are_named(weights, tmp_path):
    path = _write(tmp_path / "odd.safetensors", weights | {"something.else": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="something.else"):
        vae_layout(path)


def test_other_autoencoders_are_refused(weights, tmp_path):
    wide = dict(weights)
    wide["post_quant_conv.weight"] = np.zeros((4, 16, 1, 1), np.float32)
    with pytest.raises(ArchitectureError, match="16 latent channels"):
        load_vae_file(_write(tmp_path / "flux_ae.safetensors", wide))
    taesd = {"decoder.layers.0.weight": np.zeros((4, 4, 3, 3), np.float32)}
    with pytest.raises(ArchitectureError, match="TAESD"):
        vae_layout(_write(tmp_path / "taesd_decoder.safetensors", taesd))
    with pytest.raises(CheckpointError, match="no VAE weights"):
        vae_layout(_write(tmp_path / "lora.safetensors", {"encoder.x": np.zeros(2, np.float32)}))


def test_a_pickle_that_calls_something_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("never",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": Evil()}, path,
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="print"):
        vae_layout(path)


@pytest.mark.slow
def test_a_whole_checkpoint_in_models_vae_gives_its_vae(tmp_path):
    from mlx.utils import tree_flatten

    from sd.loading.checkpoint import load_component
    from sd.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path / "whole.safetensors", "tiny")
    assert vae_layout(path) == "ldm-prefixed"
    ours = dict(tree_flatten(load_vae_file(path, dtype="float32").parameters()))
    want = dict(tree_flatten(load_component(path, "vae", dtype="float32").parameters()))
    assert ours.keys() == want.keys() and all(mx.array_equal(ours[k], want[k]) for k in ours)
