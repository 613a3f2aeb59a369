"""LoadImage and SaveImage: masks from alpha, counters that continue and never overwrite, atomic files,
prefixes with subfolders kept inside the output folder, and the embedded workflow."""

from __future__ import annotations

import json
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from graph import ExecutionContext, Folders
from graph.disk_cache import DiskCache
from graph.executor import Caches, Executor
from graph.importers import load_workflow
from graph.plan import make_plan
from graph.runner import prepare
from nodes import images
from nodes.images import next_counter, output_location, save_exclusive

COPY = """
params: {name: pic.png, prefix: sdgraph}
nodes:
  load: {type: LoadImage, image: $name}
  save: {type: SaveImage, images: {from: load.IMAGE}, filename_prefix: $prefix}
"""


@pytest.fixture
def folders(tmp_path):
    f = Folders(tmp_path / "models", tmp_path / "input", tmp_path / "output")
    f.input_dir.mkdir()
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:8, :, 3] = 0  # top half transparent
    Image.fromarray(rgba, "RGBA").save(f.input_dir / "pic.png")
    Image.fromarray(rgba[..., :3], "RGB").save(f.input_dir / "plain.jpg")
    return f


def run_copy(tmp_path, folders, *sets):
    path = tmp_path / "copy.yaml"
    path.write_text(textwrap.dedent(COPY))
    [pv] = prepare(load_workflow(path), [s.split("=", 1) for s in sets], [], folders)
    executor = Executor(Caches(tmp_path / "cache", DiskCache(tmp_path / "cache")), folders)
    result = executor.run(make_plan(pv.bound, executor.caches.fingerprints), pv.run_info())
    return result


def test_load_image_gives_rgb_in_unit_range_and_mask_from_alpha(folders):
    image, mask = images.LoadImage("pic.png", ctx=_Ctx(folders))
    assert image.shape == (1, 16, 24, 3) and mask.shape == (1, 16, 24)
    assert np.allclose(np.array(image)[0, 0, 0], [200 / 255, 0, 0])
    m = np.array(mask)[0]
    assert (m[:8] == 1.0).all() and (m[8:] == 0.0).all()  # ComfyUI: mask = 1 - alpha
    _, no_alpha = images.LoadImage("plain.jpg", ctx=_Ctx(folders))
    assert no_alpha.shape == (1, 64, 64) and not np.array(no_alpha).any()


def test_save_image_counts_on_from_the_highest_and_embeds_the_workflow(tmp_path, folders):
    folders.output_dir.mkdir()
    (folders.output_dir / "sdgraph_00007_.png").write_bytes(b"someone else's")
    (folders.output_dir / "sdgraph_00002_.png").write_bytes(b"older")
    (folders.output_dir / "other_00050_.png").write_bytes(b"another prefix")
    result = run_copy(tmp_path, folders, "prefix=sdgraph")
    [written] = result.files
    assert written.endswith("sdgraph_00008_.png")
    assert (folders.output_dir / "sdgraph_00007_.png").read_bytes() == b"someone else's"
    with Image.open(written) as img:
        text = dict(img.text)
        pixels = np.asarray(img)
    assert pixels.shape == (16, 24, 3) and pixels[0, 0, 0] == 200
    assert json.loads(text["sdgraph"])["params"] == {"name": "pic.png", "prefix": "sdgraph"}
    comfy = json.loads(text["prompt"])
    assert comfy["save"] == {"class_type": "SaveImage", "_meta": {"title": "save"},
                             "inputs": {"images": ["load", 0], "filename_prefix": "sdgraph"}}
    assert not [p for p in folders.output_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_prefix_subfolders_stay_inside_the_output_folder(tmp_path, folders):
    [written] = run_copy(tmp_path, folders, "prefix=runs/day1/cat").files
    assert written.endswith("output/runs/day1/cat_00001_.png")
    with pytest.raises(ValueError, match="outside the output folder"):
        output_location(folders.output_dir, "../escape")


def test_saving_never_replaces_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    (tmp_path / "x_00003_.png").write_bytes(b"first")
    assert next_counter(tmp_path, "x") == 4
    # a stale count, as in a race
    monkeypatch.setattr(images, "next_counter", lambda folder, name, suffix=".png": 3)
    ctx = ExecutionContext("save", "SaveImage", Folders(), {}, tmp_path / "cache")
    path = save_exclusive(ctx, tmp_path, "x", b"second")
    assert path.name == "x_00004_.png" and path.read_bytes() == b"second"
    assert (tmp_path / "x_00003_.png").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00003_.png", "x_00004_.png"]
    assert ctx.written_files == [path]  # registered: removed if the run fails


class _Ctx:
    def __init__(self, folders):
        self.folders = folders


def test_distributed_sweeps_tag_file_names_with_the_variation(tmp_path, folders):
    from graph.distributed import FILE_TAG

    ctx = ExecutionContext("save", "SaveImage", folders, {FILE_TAG: "41dc77f006b4"}, tmp_path / "cache")
    images.SaveImage(mx.zeros((2, 8, 8, 3)), "sweep", ctx=ctx)
    assert [p.name for p in ctx.written_files] == ["sweep_41dc77f006b4_00001_.png",
                                                   "sweep_41dc77f006b4_00002_.png"]
