"""v-prediction / zero-terminal-SNR detection from small random checkpoints, the ModelSamplingDiscrete node,
and the v_prediction example workflow."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, pixels, run

from graph.context import Folders
from graph.fingerprint import FingerprintIndex
from graph.importers import load_workflow
from graph.plan import make_plan
from graph.runner import prepare
from nodes.loaders import LoadCheckpoint
from nodes.model_patches import ModelSamplingDiscrete
from nodes.sampling import model_sampling_of
from sd.errors import CheckpointError
from sd.loading.checkpoint import load_component
from sd.loading.prediction import detect_sampling
from sd.synthetic import make_checkpoint


def checkpoint_with(tmp_path, *markers: str, name="model.safetensors"):
    path = tmp_path / "models" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    make_checkpoint(path, "tiny")
    if markers:  # as ComfyUI's checkpoint saver writes them: empty float tensors at the top level
        state = load_file(str(path))
        state.update({m: np.zeros(0, np.float32) for m in markers})
        save_file(state, str(path))
    return path


def load(tmp_path, name="model.safetensors"):
    logs: list[str] = []
    ctx = SimpleNamespace(folders=Folders(tmp_path / "models", tmp_path, tmp_path), log=logs.append,
                          fingerprint=FingerprintIndex().fingerprint)
    model, _, _ = LoadCheckpoint(name, ctx=ctx)
    return model, logs


@pytest.mark.slow
@pytest.mark.parametrize("markers, prediction, zsnr", [
    ((), "eps", False),
    (("v_pred",), "v_prediction", False),
    (("v_pred", "ztsnr"), "v_prediction", True),
    (("ztsnr",), "eps", False),  # as ComfyUI: ztsnr counts only beside v_pred
])
def test_marker_keys(tmp_path, markers, prediction, zsnr):
    path = checkpoint_with(tmp_path, *markers)
    model, logs = load(tmp_path)
    assert (model.sampling.prediction, model.sampling.zsnr) == (prediction, zsnr)
    ms = model_sampling_of(model)
    assert (ms.prediction, ms.zsnr) == (prediction, zsnr)
    assert bool(logs) == (prediction != "eps") and all("v_pred" in line for line in logs)
    assert load_component(path, "unet") is not None  # the markers are not taken for unknown weights


@pytest.mark.slow
def test_companion_yaml(tmp_path):
    path = checkpoint_with(tmp_path)
    config = path.with_suffix(".yaml")
    config.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                      "  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    model, logs = load(tmp_path)
    assert model.sampling.prediction == "v_prediction" and "model.yaml" in logs[0]
    config.write_text("model:\n  params:\n    parameterization: eps\n")
    assert load(tmp_path)[0].sampling.prediction == "eps"


@pytest.mark.slow
@pytest.mark.parametrize("text", ["model: [unclosed", "!!python/object/apply:os.system ['echo hi']",
                                  "model:\n  params:\n    parameterization: x0_magic\n"])
def test_bad_companion_yaml_is_a_clear_error(tmp_path, text):
    path = checkpoint_with(tmp_path)
    path.with_suffix(".yaml").write_text(text)
    with pytest.raises(CheckpointError, match="model.yaml"):
        detect_sampling(path, set())


@pytest.mark.slow
def test_companion_yaml_is_part_of_the_cache_key(tmp_path):
    checkpoint_with(tmp_path, name="v1-5-pruned-emaonly.safetensors")
    folders = Folders(tmp_path / "models", tmp_path, tmp_path / "out")

    def key():
        [pv] = prepare(load_workflow(WORKFLOWS / "txt2img.yaml"), [], [], folders)
        return make_plan(pv.bound, FingerprintIndex()).nodes["ckpt"].key

    plain = key()
    config = tmp_path / "models" / "checkpoints" / "v1-5-pruned-emaonly.yaml"
    config.write_text("model:\n  params:\n    parameterization: \"v\"\n")
    with_config = key()
    config.write_text("model:\n  params:\n    parameterization: eps\n")
    assert len({plain, with_config, key()}) == 3
    config.unlink()
    assert key() == plain


@pytest.mark.slow
def test_model_sampling_discrete_node_replaces_the_detected_sampling(tmp_path):
    checkpoint_with(tmp_path, "v_pred")
    model, _ = load(tmp_path)
    patched = ModelSamplingDiscrete(model, sampling="lcm", zsnr=True)
    assert (patched.sampling.prediction, patched.sampling.zsnr) == ("lcm", True)
    assert patched.checkpoint == model.checkpoint and patched.patches == model.patches
    assert model_sampling_of(patched).skip_steps == 20


@pytest.mark.slow
def test_v_prediction_workflow_runs_after_demo(tmp_path_factory, tmp_path):
    world = make_world(tmp_path_factory, tmp_path)
    result = run(world, WORKFLOWS / "v_prediction.yaml", *SMALL)
    assert result.rc == 0, result.err
    [vpred] = world.pngs()
    # KSampler honours the patch: read as an eps model, the same weights and seed give another image
    result = run(world, WORKFLOWS / "v_prediction.yaml", *SMALL, "--set", "sampling=eps",
                 "--set", "zsnr=false")
    assert result.rc == 0, result.err
    [eps] = [p for p in world.pngs() if p != vpred]
    assert not np.array_equal(pixels(vpred), pixels(eps))
