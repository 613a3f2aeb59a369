"""CheckpointSave writes the merged MODEL/CLIP/VAE as one LDM-layout .safetensors under output/checkpoints/,
never overwriting (ComfyUI's counter), that sdgraph loads back to the very same weights and diffusers'
single-file conversion loads to the same models as the merge computed in numpy from the source files."""

from __future__ import annotations

import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open
from safetensors.numpy import load_file
from sd_nodes_testing import make_world, run

from nodes import merging, models
from nodes.values import ClipRecipe, FileRef, ModelRecipe, VaeRecipe
from sd.loading.checkpoint import load_checkpoint

UNET, CLIP, VAE = "model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model."
WORKFLOW = """
nodes:
  a: {type: CheckpointLoaderSimple, ckpt_name: v1-5-pruned-emaonly.safetensors}
  b: {type: CheckpointLoaderSimple, ckpt_name: other-model.safetensors}
  hn: {type: HypernetworkLoader, model: {from: a.MODEL}, hypernetwork_name: demo-hypernetwork.pt}
  merge: {type: ModelMergeSimple, model1: {from: hn.MODEL}, model2: {from: b.MODEL}, ratio: 0.3}
  clip_merge: {type: CLIPMergeSimple, clip1: {from: a.CLIP}, clip2: {from: b.CLIP}, ratio: 0.7}
  save:
    type: CheckpointSave
    model: {from: merge.MODEL}
    clip: {from: clip_merge.CLIP}
    vae: {from: b.VAE}
    filename_prefix: checkpoints/merged
"""


class Ctx:
    def log(self, msg: str) -> None:
        pass


@pytest.fixture
def saved(tmp_path_factory, tmp_path):
    world = make_world(tmp_path_factory, tmp_path)
    taken = world.output / "checkpoints" / "merged_00001_.safetensors"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"a file the user keeps")
    workflow = tmp_path / "save.yaml"
    workflow.write_text(WORKFLOW)
    result = run(world, workflow)
    assert result.rc == 0, result.err
    assert taken.read_bytes() == b"a file the user keeps"  # never overwritten: the next counter
    path = world.output / "checkpoints" / "merged_00002_.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == [taken.name, path.name]  # no temp files left
    return world, path


def _expected(world) -> dict[str, np.ndarray]:
    """The merge in numpy from the source files: UNet 0.3 a + 0.7 b, CLIP 0.7 a + 0.3 b, b's VAE."""
    a = load_file(world.checkpoint)
    b = load_file(world.models / "checkpoints" / "other-model.safetensors")
    out = {}
    for key, value in a.items():
        if key.startswith(UNET):
            out[key] = 0.3 * value + 0.7 * b[key]
        elif key.startswith(CLIP) and not key.endswith("position_ids"):
            out[key] = 0.7 * value + 0.3 * b[key]
        else:
            out[key] = b[key]
    return out


@pytest.mark.slow
def test_checkpoint_save_loads_back_identically_in_sdgraph(saved):
    world, path = saved
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert keys == set(load_file(world.checkpoint))  # the LDM layout of the source, position_ids included
    assert not any("kv_patches" in k for k in keys)  # hypernetworks are not weights (as in ComfyUI)
    assert metadata["modelspec.predict_key"] == "epsilon" and "CheckpointSave" in metadata["sdgraph_workflow"]
    a, b = FileRef.of(world.checkpoint), FileRef.of(world.models / "checkpoints" / "other-model.safetensors")
    unet = models.unet_for(merging.ModelMergeSimple(ModelRecipe(a), ModelRecipe(b), 0.3, ctx=Ctx()))
    clip = models.clip_for(merging.CLIPMergeSimple(ClipRecipe(a), ClipRecipe(b), 0.7, ctx=Ctx()))
    vae = models.vae_for(VaeRecipe(b))
    loaded = load_checkpoint(path)
    for ours, back in ((unet, loaded.unet), (clip, loaded.clip), (vae, loaded.vae)):
        mine, theirs = dict(tree_flatten(ours.parameters())), dict(tree_flatten(back.parameters()))
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(np.array(mine[k]), np.array(theirs[k])) for k in mine)
    expected = _expected(world)
    state = load_file(path)
    assert max(float(np.abs(state[k].astype(np.float64) - expected[k]).max()) for k in expected) <= 1e-6


def _diffusers_config(folder, name: str, class_name: str, config: dict):
    import json

    (folder / name).mkdir(parents=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    (folder / name / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))


@pytest.mark.slow  # diffusers / transformers imports
def test_checkpoint_save_loads_in_diffusers_single_file_loader(saved, tmp_path):
    """UNet and VAE through diffusers' `from_single_file` (a local config: no hub), the text encoder through
    the single-file CLIP conversion; each equals the model built from the numpy merge of the sources."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from reference import diffusers_unet, diffusers_unet_config, diffusers_vae, read_state, transformers_clip

    world, path = saved
    loaded = load_checkpoint(path)
    expected = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _expected(world).items()}
    config = tmp_path / "config"
    _diffusers_config(config, "unet", "UNet2DConditionModel", diffusers_unet_config(loaded.unet_config))
    reference_vae = diffusers_vae(loaded.vae_config, expected)
    _diffusers_config(config, "vae", "AutoencoderKL", dict(reference_vae.config))
    pairs = [
        (UNet2DConditionModel.from_single_file(str(path), config=str(config), subfolder="unet",
                                               local_files_only=True),
         diffusers_unet(loaded.unet_config, expected)),
        (AutoencoderKL.from_single_file(str(path), config=str(config), subfolder="vae",
                                        local_files_only=True), reference_vae),
        (transformers_clip(loaded.clip_config, read_state(path)),
         transformers_clip(loaded.clip_config, expected)),
    ]
    for from_file, from_numpy in pairs:
        ours, theirs = from_file.state_dict(), from_numpy.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            if ours[key].is_floating_point():
                assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=0), key
