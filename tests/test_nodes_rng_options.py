"""The sdgraph-only options of CLIPEncode (weighting) and KSampler (noise_device) through the nodes.

Their numbers are checked in tests/test_a1111_weights.py and tests/test_rng_modes.py; here: the nodes pass
the options on, the defaults keep ComfyUI's behaviour, and exports to ComfyUI leave the defaults out.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sd_nodes_testing import make_world

from graph import Folders
from graph.fingerprint import FingerprintIndex
from nodes.comfy_table import COMFY_TO_OURS
from nodes.values import ClipRecipe, FileRef


class Ctx:
    def __init__(self, folders):
        self.folders = folders
        self.cancel_event = threading.Event()
        self.fingerprint = FingerprintIndex().fingerprint

    def log(self, msg: str) -> None:
        pass


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


def test_clip_encode_weighting(world):
    from nodes.conditioning import CLIPEncode

    ctx = Ctx(Folders(world.models, world.input, world.output))
    clip = ClipRecipe(FileRef.of(world.checkpoint))
    comfy = CLIPEncode(clip, "a (red:1.3) fox", ctx=ctx)
    default = CLIPEncode(clip, "a (red:1.3) fox", "comfy", ctx=ctx)
    a1111 = CLIPEncode(clip, "a (red:1.3) fox", "a1111", ctx=ctx)
    np.testing.assert_array_equal(np.array(comfy.cond), np.array(default.cond))
    assert np.abs(np.array(a1111.cond) - np.array(comfy.cond)).max() > 1e-4
    assert CLIPEncode(clip, "a fox BREAK a hen", "a1111", ctx=ctx).cond.shape[1] == 154


def test_new_inputs_are_left_out_of_comfyui_exports():
    assert {"noise_device", "eta_noise_seed_delta"} <= COMFY_TO_OURS["KSampler"].ours_only
    assert {"noise_device", "eta_noise_seed_delta"} <= COMFY_TO_OURS["KSamplerAdvanced"].ours_only
    assert "weighting" in COMFY_TO_OURS["CLIPTextEncode"].ours_only
