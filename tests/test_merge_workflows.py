"""The merging examples run after `sdgraph demo`: model_merge.yaml (LoRA, merge, image, CheckpointSave),
hypernetwork.yaml (a strength of 0 is the plain checkpoint), add_difference_inpaint.yaml (a 9-channel
inpainting UNet merged with 4-channel ones)."""

from __future__ import annotations

import numpy as np
import pytest
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, pixels, run, run_cli


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@pytest.mark.slow
def test_model_merge_workflow_writes_an_image_and_a_checkpoint(world):
    result = run(world, WORKFLOWS / "model_merge.yaml", *SMALL)
    assert result.rc == 0, result.err
    assert [p.name for p in world.pngs()] == ["model_merge_00001_.png"]
    assert (world.output / "checkpoints" / "merged_00001_.safetensors").is_file()
    # ratio 1 is model1 (with its LoRA) alone: the merge leaves the recipe unchanged
    alone = run(world, WORKFLOWS / "model_merge.yaml", *SMALL, "--set", "ratio=1",
                "--set", "save.filename_prefix=a")
    assert alone.rc == 0, alone.err
    blended, first = (pixels(world.output / n) for n in ("model_merge_00001_.png", "a_00001_.png"))
    assert not np.array_equal(blended, first)


@pytest.mark.slow
def test_hypernetwork_workflow_at_strength_zero_is_the_checkpoint(world):
    result = run(world, WORKFLOWS / "hypernetwork.yaml", *SMALL, "--set", "strength=0",
                 "--set", "save.filename_prefix=zero")
    assert result.rc == 0, result.err
    plain = run(world, WORKFLOWS / "txt2img.yaml", *SMALL, "--set", "seed=42", "--set", "cfg=7.0",
                "--set", "prompt=an old stone bridge over a river, autumn, oil painting",
                "--set", "negative=blurry, low quality", "--set", "prefix=plain")
    assert plain.rc == 0, plain.err
    with_hn = run(world, WORKFLOWS / "hypernetwork.yaml", *SMALL, "--set", "save.filename_prefix=hn")
    assert with_hn.rc == 0, with_hn.err
    zero, hn = pixels(world.output / "zero_00001_.png"), pixels(world.output / "hn_00001_.png")
    assert np.abs(zero.astype(int) - pixels(world.output / "plain_00001_.png").astype(int)).max() <= 1
    assert not np.array_equal(zero, hn)


@pytest.mark.slow
def test_add_difference_inpaint_workflow(world):
    from sd.io.checkpoint_io import open_tensors
    from sd.loading.checkpoint import load_checkpoint

    inpaint = world.models / "checkpoints" / "sd-v1-5-inpainting.safetensors"
    check = run_cli("validate", str(WORKFLOWS / "add_difference_inpaint.yaml"), *world.folder_args()[:6])
    assert check.rc == 0, check.err
    result = run(world, WORKFLOWS / "add_difference_inpaint.yaml")
    assert result.rc == 0, result.err
    merged = world.output / "checkpoints" / "inpainting_merged_00001_.safetensors"
    assert load_checkpoint(merged, parts=("unet",)).unet_config.in_channels == 9
    first_conv = "model.diffusion_model.input_blocks.0.0.weight"  # not merged: the inpainting model's
    np.testing.assert_array_equal(np.array(open_tensors(merged)[first_conv]),
                                  np.array(open_tensors(inpaint)[first_conv]))
