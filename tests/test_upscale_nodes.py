"""UpscaleModelLoader and ImageUpscaleWithModel through the real CLI, on the `sdgraph demo` stand-ins: the
upscaled PNG is what sd.image.upscale makes of the input, the result is cached like any IMAGE (a re-run in a
new process loads no model), a missing or wrong file is one clear error, and ComfyUI API files with these
classes import."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from sd_nodes_testing import make_world, pixels, reset_loads, run

from graph.importers import load_workflow
from graph.validate import validate
from nodes import models

WORKFLOW = """
params: {upscale_model: 4x-UltraSharp.pth}
nodes:
  load:     {type: LoadImage, image: example.png}
  upscaler: {type: UpscaleModelLoader, model_name: $upscale_model}
  enlarge:
    type: ImageUpscaleWithModel
    upscale_model: {from: upscaler.UPSCALE_MODEL}
    image: {from: load.IMAGE}
  save:     {type: SaveImage, images: {from: enlarge.IMAGE}, filename_prefix: up}
"""


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@pytest.fixture
def workflow(tmp_path):
    path = tmp_path / "upscale.yaml"
    path.write_text(WORKFLOW)
    return path


@pytest.mark.slow
def test_upscale_workflow_writes_the_models_output_and_caches_it(world, workflow):
    from sd.image.upscale import upscale_image
    from sd.loading.upscale_models import load_upscale_model

    reset_loads()
    result = run(world, workflow)
    assert result.rc == 0, result.err
    [png] = world.pngs()
    got = pixels(png)
    assert got.shape == (256, 256, 3)  # the demo's 64x64 example.png, x4
    source = pixels(world.input / "example.png").astype(np.float32)[None] / 255.0
    model = load_upscale_model(world.models / "upscale_models" / "4x-UltraSharp.pth")
    expected = np.array(upscale_image(model, mx.array(source)))[0]
    assert np.abs(got.astype(np.float32) - np.clip(255.0 * expected, 0, 255).astype(np.uint8)).max() <= 1
    assert models.LOAD_COUNTS["upscale"] == 1

    reset_loads()  # as a new process: the upscaled IMAGE comes from the disk cache, no model is loaded
    png.unlink()  # so that SaveImage runs again and needs the image
    again = run(world, workflow)
    assert again.rc == 0, again.err
    assert again.statuses()["enlarge"] == "disk cache" and models.LOAD_COUNTS["upscale"] == 0
    assert (pixels(png) == got).all()


def test_a_missing_upscale_model_lists_what_is_there(world, workflow):
    result = run(world, workflow, "--set", "upscale_model=4x-Missing.pth")
    assert result.rc == 2
    assert "upscale model '4x-Missing.pth' not found" in result.err and "4x-UltraSharp.pth" in result.err


def test_a_checkpoint_given_as_upscale_model_fails_at_the_loader(world, workflow):
    result = run(world, workflow, "--set", f"upscale_model={world.checkpoint}")
    assert result.rc == 1
    assert "upscaler" in result.err and "not an upscale model" in result.err


def test_comfy_api_upscale_workflow_imports(tmp_path):
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png", "upload": "image"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}},
        "3": {"class_type": "ImageUpscaleWithModel",
              "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ComfyUI"}},
    }
    path = tmp_path / "api.json"
    path.write_text(json.dumps(api))
    wf = load_workflow(path)
    assert sorted(n.type for n in wf.nodes.values()) == ["ImageUpscaleWithModel", "LoadImage", "SaveImage",
                                                          "UpscaleModelLoader"]
    validate(wf)


def _blank_png(path, side: int) -> None:
    """A greyscale PNG of side x side zeros, written without holding the image (validation reads only the
    header; nothing decodes it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


@pytest.mark.slow
def test_an_upscale_too_large_for_this_machine_is_refused_before_running(world, tmp_path):
    """The plan's memory estimate knows the model's scale from the file's header: a 9000x9000 image
    upscaled 8x (over 100 GB of output and sums) is refused at validation, naming the upscaling node."""
    from sd.synthetic.upscale import esrgan_state, write_upscale_model

    model = write_upscale_model(tmp_path / "8x.pth", esrgan_state("old", scale=8, num_feat=4))
    _blank_png(tmp_path / "huge.png", 9000)
    flow = tmp_path / "huge.yaml"
    flow.write_text(WORKFLOW.replace("example.png", str(tmp_path / "huge.png")))
    result = run(world, flow, "--set", f"upscale_model={model}")
    assert result.rc == 2, result.err
    assert "enlarge" in result.err and "72000x72000" in result.err and "nothing was run" in result.err


def test_a_model_for_other_channel_counts_is_a_clear_error(world, workflow, tmp_path):
    from sd.synthetic.upscale import esrgan_state, write_upscale_model

    grey = write_upscale_model(tmp_path / "1x-grey.pth", esrgan_state("old", scale=1, channels=1, num_feat=4))
    result = run(world, workflow, "--set", f"upscale_model={grey}")
    assert result.rc == 1
    assert "1x-grey.pth upscales 1-channel images; the image has 3 channels" in result.err
