"""Issue 21, items 1-3 and parts of 5 and 6: outputs always land in this run's folder, no file-system
error loops or tracebacks, every user-supplied name is checked before anything runs, `convert -o` never
clobbers, and what a new user tripped on (the help's sweep example, ComfyUI ids and class names,
img2img's size, PNG modes, "1 variations")."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import threading
import types

import pytest
from sd_nodes_testing import REPO, SMALL, WORKFLOWS, make_world, pixels, run, run_cli

from graph import ExecutionContext, Folders
from graph.declare import get_spec
from graph.errors import ValidationFailed
from nodes.images import save_exclusive

TXT2IMG = WORKFLOWS / "txt2img.yaml"
IMG2IMG = WORKFLOWS / "img2img.yaml"
TINY = ["--set", "width=64", "--set", "height=64", "--set", "steps=1"]
LONG = "a" * 300


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


def folder_args(world, output) -> list[str]:
    return ["--models-dir", str(world.models), "--input-dir", str(world.input), "--output-dir", str(output)]


# -- item 1: a cached SaveImage still writes into this run's output folder -----------------------------

@pytest.mark.slow
def test_cached_save_materialises_in_the_new_output_folder(world, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    first = run_cli("run", TXT2IMG, *folder_args(world, a), "--cache-dir", world.cache, *TINY, "--json")
    assert first.rc == 0, first.err
    second = run_cli("run", TXT2IMG, *folder_args(world, b), "--cache-dir", world.cache, *TINY, "--json")
    assert second.rc == 0, second.err
    [written] = sorted(b.glob("*.png"))
    assert second.json["files"] == [str(written.resolve())] or written.name in second.json["files"][0]
    st = second.statuses()
    assert st["save"] == "ran" and st["decode"] == "disk cache"  # the output folder keys nothing upstream
    assert st["sampler"] == "not needed"
    assert (pixels(written) == pixels(next(a.glob("*.png")))).all()
    again = run_cli("run", TXT2IMG, *folder_args(world, b), "--cache-dir", world.cache, *TINY, "--json")
    assert again.statuses()["save"] == "disk cache" and len(list(b.glob("*.png"))) == 1  # already there


@pytest.mark.slow
def test_cached_save_takes_a_fresh_counter_when_the_name_is_taken(world, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    b.mkdir()
    (b / "txt2img_00001_.png").write_bytes(b"someone else's")
    assert run_cli("run", TXT2IMG, *folder_args(world, a), "--cache-dir", world.cache, *TINY).rc == 0
    res = run_cli("run", TXT2IMG, *folder_args(world, b), "--cache-dir", world.cache, *TINY, "--json")
    assert res.rc == 0, res.err
    assert (b / "txt2img_00001_.png").read_bytes() == b"someone else's"
    assert (b / "txt2img_00002_.png").exists() and res.json["files"][0].endswith("txt2img_00002_.png")


# -- item 2: file-system errors are bounded, clear, and found before running where they can be ----------

@pytest.mark.slow
def test_output_dir_that_is_a_file_is_refused_before_running(world, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = run_cli("validate", TXT2IMG, *folder_args(world, blocker))
    assert res.rc == 2 and str(blocker) in res.err and "--output-dir" in res.err
    proc = subprocess.run([sys.executable, "-m", "cli", "run", str(TXT2IMG), *folder_args(world, blocker),
                           "--no-cache", *TINY], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr and blocker.read_text() == "x"


def test_prefix_subfolder_that_is_a_file_is_refused_before_running(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("x")
    res = run_cli("run", TXT2IMG, *folder_args(world, out), "--no-cache", *TINY, "--set", "prefix=sub/cat")
    assert res.rc == 2, res.err
    assert "node 'save' input 'filename_prefix'" in res.err and str(out / "sub") in res.err


def test_unwritable_output_folder_is_refused_before_running(world, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(out) and real(p, mode, **kw))
    res = run_cli("validate", TXT2IMG, *folder_args(world, out))
    assert res.rc == 2 and "not writable" in res.err and str(out) in res.err


@pytest.mark.slow
def test_a_write_error_while_running_is_one_line_and_exit_1(world, tmp_path, monkeypatch):
    spec = get_spec("SaveImage")
    monkeypatch.setitem(spec.writes_files, "filename_prefix", lambda value, folders: None)  # not checked
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = run_cli("run", TXT2IMG, *folder_args(world, blocker), "--no-cache", *TINY)
    assert res.rc == 1 and "node 'save' (SaveImage) failed" in res.err and str(blocker) in res.err
    assert "Traceback" not in res.err


def _in_thread(fn, seconds=20):
    """fn() in a daemon thread: (returned, raised); fails the test if it does not end in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the save loop did not end"
    return box.get("value"), box.get("error")


def test_save_loop_is_bounded_on_every_error(tmp_path, monkeypatch):
    ctx = ExecutionContext("save", "SaveImage", Folders(output_dir=tmp_path), {}, tmp_path / "cache")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _, err = _in_thread(lambda: save_exclusive(ctx, blocker, "img", b"png"))
    assert isinstance(err, OSError) and str(blocker) in str(err)

    @contextlib.contextmanager
    def denied(path, overwrite=True):
        raise PermissionError(13, "Permission denied", str(path))
        yield

    monkeypatch.setattr(ctx, "output_file", denied)
    _, err = _in_thread(lambda: save_exclusive(ctx, tmp_path, "img", b"png"))
    assert isinstance(err, OSError) and "permission denied" in str(err) and "img_00001_.png" in str(err)

    @contextlib.contextmanager
    def always_taken(path, overwrite=True):
        raise FileExistsError(str(path))
        yield

    monkeypatch.setattr(ctx, "output_file", always_taken)
    _, err = _in_thread(lambda: save_exclusive(ctx, tmp_path, "img", b"png"))
    assert isinstance(err, OSError) and "no free file name" in str(err)

    @contextlib.contextmanager
    def too_long(path, overwrite=True):
        raise OSError(36, "File name too long", str(path))
        yield

    monkeypatch.setattr(ctx, "output_file", too_long)
    _, err = _in_thread(lambda: save_exclusive(ctx, tmp_path, "img", b"png"))
    assert isinstance(err, OSError) and "too long" in str(err)


# -- item 3: every user-supplied name is checked before running ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("workflow,target,value", [
    (TXT2IMG, "ckpt", LONG + ".safetensors"),
    (WORKFLOWS / "multi_lora.yaml", "lora1_name", LONG + ".safetensors"),
    (IMG2IMG, "image", LONG + ".png"),
    (TXT2IMG, "prefix", LONG),
    (TXT2IMG, "prefix", "sub/" + LONG),
    (TXT2IMG, "prefix", "con"),
    (TXT2IMG, "prefix", "night/LPT1.x"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_names_are_validation_errors_naming_node_and_input(world, tmp_path, workflow, target, value,
                                                                command):
    res = run_cli(command, workflow, *folder_args(world, tmp_path / "out"), *(
        ["--no-cache"] if command == "run" else []), "--set", f"{target}={value}")
    assert res.rc == 2, res.err
    assert "Traceback" not in res.err and "node '" in res.err and "input '" in res.err
    assert not (tmp_path / "out").exists()


def test_nul_bytes_in_names_are_refused_by_the_one_helper(world, tmp_path):
    from nodes.paths import check_name

    for kind in ("checkpoint name", "filename_prefix"):
        with pytest.raises(ValueError, match="NUL byte"):
            check_name("a\x00b", kind)
    with pytest.raises(ValueError, match="reserves"):
        check_name("sub/aux.png", "filename_prefix", writing=True)
    assert check_name("sub/aux.png", "image name") == "sub/aux.png"  # reading a file Linux allows
    wf = tmp_path / "nul.yaml"
    wf.write_text(TXT2IMG.read_text().replace("ckpt: v1-5-pruned-emaonly.safetensors",
                                              'ckpt: "v1-5\\0.safetensors"'))
    res = run_cli("validate", wf, *folder_args(world, tmp_path / "out"))
    assert res.rc == 2 and "node 'ckpt' input 'ckpt_name'" in res.err and "NUL" in res.err


# -- item 5: convert -o never clobbers -----------------------------------------------------------------

def test_convert_never_overwrites_without_force(tmp_path):
    out = tmp_path / "wf.json"
    out.write_text("keep me")
    res = run_cli("convert", TXT2IMG, "-o", out)
    assert res.rc == 2 and "--force" in res.err and out.read_text() == "keep me"
    res = run_cli("convert", TXT2IMG, "-o", out, "--force")
    assert res.rc == 0 and out.read_text().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wf.json"]  # no temp file left


def test_convert_never_replaces_its_input_or_a_non_regular_file(tmp_path):
    src = tmp_path / "wf.yaml"
    src.write_text(TXT2IMG.read_text())
    res = run_cli("convert", src, "-o", src, "--force")
    assert res.rc == 2 and "input file itself" in res.err and src.read_text() == TXT2IMG.read_text()
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    res = run_cli("convert", src, "-o", fifo, "--force")
    assert res.rc == 2 and "not a regular file" in res.err and stat.S_ISFIFO(os.stat(fifo).st_mode)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert run_cli("convert", src, "-o", folder, "--force").rc == 2 and folder.is_dir()


# -- item 6: what a new user tripped on ---------------------------------------------------------------

def test_the_help_sweep_example_works_as_written(world, monkeypatch):
    import cli

    [line] = [x.strip() for x in cli.EPILOG.splitlines() if "--sweep" in x and "@prompts" in x]
    words = line.split()
    assert words[:2] == ["sdgraph", "run"]
    monkeypatch.chdir(REPO)
    res = run_cli("validate", *words[2:], "--models-dir", world.models)
    assert res.rc == 0, res.err
    prompts = [x for x in (WORKFLOWS / "prompts.txt").read_text().splitlines() if x.strip()]
    assert f"{3 * len(prompts)} variations" in res.out


def test_comfy_ids_are_accepted_by_set(world):
    comfy = REPO / "tests" / "data" / "comfy" / "txt2img_api.json"
    res = run_cli("validate", comfy, "--models-dir", world.models, "--set", "3.seed=5", "--set", "3.steps=2")
    assert res.rc == 0, res.err
    from graph.importers import load_workflow
    from graph.sweep import apply_overrides

    effective, _ = apply_overrides(load_workflow(comfy), {"3.seed": "5"})
    assert effective.nodes["sampler_3"].inputs["seed"] == 5


COMFY_NAMED = """
nodes:
  ckpt:   {type: CheckpointLoaderSimple, ckpt_name: v1-5-pruned-emaonly.safetensors}
  pos:    {type: CLIPTextEncode, clip: {from: ckpt.CLIP}, text: a red cube}
  neg:    {type: CLIPTextEncode, clip: {from: ckpt.CLIP}, text: blurry}
  latent: {type: EmptyLatentImage, width: 64, height: 64}
  lora:   {type: LoraLoader, model: {from: ckpt.MODEL}, clip: {from: ckpt.CLIP},
           lora_name: style.safetensors, strength_model: 0.5}
  sampler:
    type: KSampler
    model: {from: lora.MODEL}
    positive: {from: pos.CONDITIONING}
    negative: {from: neg.CONDITIONING}
    latent_image: {from: latent.LATENT}
    steps: 1
  decode: {type: VAEDecode, samples: {from: sampler.LATENT}, vae: {from: ckpt.VAE}}
  save:   {type: SaveImage, images: {from: decode.IMAGE}, filename_prefix: comfy}
"""


@pytest.mark.slow
def test_comfy_class_names_are_aliases_in_yaml(world, tmp_path):
    wf = tmp_path / "comfy_named.yaml"
    wf.write_text(COMFY_NAMED)
    res = run(world, wf, cache=False)
    assert res.rc == 0, res.err
    assert [p.name for p in world.pngs()] == ["comfy_00001_.png"]
    assert run_cli("nodes", "CheckpointLoaderSimple").out.startswith("LoadCheckpoint")


@pytest.mark.slow
def test_img2img_takes_width_and_height_and_keeps_its_default_output(world, tmp_path):
    from PIL import Image

    old = tmp_path / "img2img_before.yaml"  # the workflow as it was, without the resize
    lines = [x for x in IMG2IMG.read_text().splitlines() if not x.startswith("  resize:")]
    old.write_text("\n".join(lines).replace("{from: resize.LATENT}", "{from: encode.LATENT}"))
    assert "resize." not in old.read_text() and "LatentUpscale" not in old.read_text()
    args = ["--set", "steps=1", "--no-cache"]
    before = run_cli("run", old, *folder_args(world, tmp_path / "before"), *args)
    after = run_cli("run", IMG2IMG, *folder_args(world, tmp_path / "after"), *args)
    assert before.rc == after.rc == 0, after.err
    [a], [b] = (list((tmp_path / d).glob("*.png")) for d in ("before", "after"))
    assert (pixels(a) == pixels(b)).all()
    sized = run_cli("run", IMG2IMG, *folder_args(world, tmp_path / "sized"), *args, "--set", "width=128")
    assert sized.rc == 0, sized.err
    with Image.open(next((tmp_path / "sized").glob("*.png"))) as img:
        assert img.size == (128, 128)  # height from the aspect ratio of the 64x64 input


@pytest.mark.slow
def test_output_pngs_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        res = run(world, TXT2IMG, *SMALL, cache=False)
    finally:
        os.umask(old)
    assert res.rc == 0, res.err
    [png] = world.pngs()
    assert stat.S_IMODE(png.stat().st_mode) == 0o644


def test_one_variation_is_singular(capsys):
    from graph.distributed.runner import report

    manifest = {"workflow": "wf.yaml", "seconds": 1.0, "files": [], "failed": [], "variations": [],
                "counts": {"variations": 1, "ran": 1, "skipped": 0, "failed": 0},
                "distributed": {"ranks": 1, "backend": "ring",
                                "per_rank": [{"rank": 0, "variations": 1, "failed": 0, "seconds": 1.0}]}}
    report(manifest, types.SimpleNamespace(manifest=None, as_json=False, quiet=False))
    out = capsys.readouterr().out
    assert "1 variation on 1 rank" in out and "rank 0: 1 variation," in out and "1 variations" not in out


def test_validation_failed_is_raised_not_a_traceback_for_names_in_validate_api(world):
    from graph.importers import load_workflow
    from graph.runner import prepare

    with pytest.raises(ValidationFailed) as e:
        folders = Folders(world.models, world.input, world.output)
        prepare(load_workflow(TXT2IMG), [("ckpt", LONG)], [], folders)
    assert "ckpt_name" in str(e.value)
