"""workflows/outpaint_canvas.yaml runs after `sdgraph demo` through the real CLI (no model is loaded), and
the same graph written as a ComfyUI API-format file gives the same pixels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from sd_nodes_testing import WORKFLOWS, pixels, run_cli

from nodes.demo import make_demo

ARGS = ["--set", "width=48", "--set", "feathering=4", "--set", "grow=2", "--cache-dir", "cache"]


@pytest.mark.slow
def test_outpaint_canvas_runs_after_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo("models", "input", image_size=64, out=io.StringIO())
    result = run_cli("run", WORKFLOWS / "outpaint_canvas.yaml", *ARGS, "-q")
    assert result.rc == 0, result.err
    assert result.out.split() == ["output/outpaint_00001_.png", "output/outpaint_mask_00001_.png"]
    canvas = pixels(tmp_path / "output/outpaint_00001_.png")
    mask = pixels(tmp_path / "output/outpaint_mask_00001_.png")
    # 64x64 example scaled to 48 wide, then 64 pixels more on the left, right and bottom
    assert canvas.shape == mask.shape == (48 + 64, 64 + 48 + 64, 3)
    assert np.all(mask[:, :60] == 255) and np.all(mask[52:] == 255)  # the margins, grown by 2 pixels
    assert np.all(mask[:40, 72:104] == 0)  # inside the image, beyond the feathered band
    assert np.all(np.abs(canvas[:, :60].astype(int) - 0x40) <= 1)  # margins filled with color 0x404040
    assert np.ptp(canvas[:40, 72:104]) > 50  # the image itself is untouched (a gradient)


def comfy_api_twin() -> dict:
    """outpaint_canvas.yaml's first half as ComfyUI would export it (API format)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png", "upload": "image"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
                                                      "width": 48, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["2", 0], "left": 64, "top": 0,
                                                               "right": 64, "bottom": 64, "feathering": 4}},
        "4": {"class_type": "GrowMask", "inputs": {"mask": ["3", 1], "expand": 2, "tapered_corners": True}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                      "color": 4210752}},
        "6": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["3", 0], "source": ["5", 0],
                                                                "x": 0, "y": 0, "resize_source": True,
                                                                "mask": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "comfy"}},
    }


@pytest.mark.slow
def test_the_comfyui_api_twin_gives_the_same_canvas(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_demo("models", "input", image_size=64, out=io.StringIO())
    assert run_cli("run", WORKFLOWS / "outpaint_canvas.yaml", *ARGS, "-q").rc == 0
    api = tmp_path / "outpaint_api.json"
    api.write_text(json.dumps(comfy_api_twin()))
    result = run_cli("run", api, "--cache-dir", "cache", "-q")
    assert result.rc == 0, result.err
    ours = pixels(tmp_path / "output/outpaint_00001_.png")
    theirs = pixels(tmp_path / "output/comfy_00001_.png")
    np.testing.assert_array_equal(ours, theirs)
    converted = tmp_path / "converted.yaml"
    assert run_cli("convert", api, "-o", converted).rc == 0
    assert "ImagePadForOutpaint" in converted.read_text()


def test_huge_images_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """The image operations have memory estimates: a 4096 x 16384² EmptyImage, or an 8x ImageScaleBy of
    the result of a pad, is exit 2 naming the node, before any node runs."""
    monkeypatch.chdir(tmp_path)
    wf = tmp_path / "huge.yaml"
    wf.write_text("""nodes:
  empty: {type: EmptyImage, width: 16384, height: 16384, batch_size: 4096}
  save:  {type: SaveImage, images: {from: empty.IMAGE}}
""")
    result = run_cli("run", wf, "--cache-dir", "cache")
    assert result.rc == 2 and "node 'empty'" in result.err and "16384x16384" in result.err, result.err
    wf.write_text("""nodes:
  empty: {type: EmptyImage, width: 1024, height: 1024, batch_size: 64}
  pad:   {type: ImagePadForOutpaint, image: {from: empty.IMAGE}, left: 4096, right: 4096}
  scale: {type: ImageScaleBy, image: {from: pad.IMAGE}, scale_by: 8.0}
  save:  {type: SaveImage, images: {from: scale.IMAGE}}
""")
    result = run_cli("run", wf, "--cache-dir", "cache")
    assert result.rc == 2 and "node 'scale'" in result.err, result.err
    assert not (tmp_path / "output").exists()


def test_load_image_mask_refuses_an_oversized_file_at_validation(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "input").mkdir()
    Image.new("L", (20000, 4)).save(tmp_path / "input" / "wide.png")
    wf = tmp_path / "mask.yaml"
    wf.write_text("""nodes:
  m:    {type: LoadImageMask, image: wide.png, channel: red}
  img:  {type: MaskToImage, mask: {from: m.MASK}}
  save: {type: SaveImage, images: {from: img.IMAGE}}
""")
    result = run_cli("run", wf, "--cache-dir", "cache")
    assert result.rc == 2 and "node 'm'" in result.err and "at most 16384" in result.err, result.err
