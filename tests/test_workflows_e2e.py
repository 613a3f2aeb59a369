"""Every workflow in workflows/ runs end to end through the real CLI on tiny random models, and writes
PNGs that carry the workflow; `sdgraph run image.png` reproduces an image byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, pixels, png_text, reset_loads, run, run_cli

from nodes import models

HIRES = ["--set", "width=32", "--set", "height=32", "--set", "hires_width=64", "--set", "hires_height=64",
         "--set", "steps=2", "--set", "hires_steps=2"]
SIZES = {
    "txt2img": SMALL,
    "img2img": ["--set", "steps=2"],  # the size comes from input/example.png (64x64 here)
    "multi_lora": SMALL,
    "prompt_sweep": SMALL,
    "same_seed_elsewhere": SMALL,
    "external_vae": SMALL,
    "embeddings": SMALL,  # the demo's random models/embeddings/easynegative.safetensors
    "v_prediction": SMALL,
    # hires fix: a 32x32 first pass, the second at 64x64 (LatentUpscale's smallest size)
    "hires_fix_latent": HIRES,
    "hires_fix_model": HIRES,  # 32 -> 128 pixels through the demo's 4x ESRGAN, latent resized to 64
    "model_merge": SMALL,
    "hypernetwork": SMALL,
    "area_composition": SMALL,
    "custom_sampling": SMALL,
    "inpaint": ["--set", "steps=2"],  # input/example.png and example_mask.png, 64x64 here
    "controlnet": SMALL,  # the demo's random ControlNet on the Canny edges of input/example.png
    "gligen": SMALL,  # the demo's random models/gligen/gligen_sd14_textbox_pruned.safetensors
}
SAVE_ONLY = {"add_difference_inpaint"}  # writes a checkpoint, no image: tests/test_merge_workflows.py
WIDER = {"outpaint"}  # its image is the input plus margins: tests/test_inpaint_workflows.py


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


MODEL_FREE = {"outpaint_canvas"}  # image operations only: run by tests/test_image_workflows.py


def test_every_shipped_workflow_is_covered():
    assert {p.stem for p in WORKFLOWS.glob("*.yaml")} == set(SIZES) | MODEL_FREE | SAVE_ONLY | WIDER


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SIZES))
def test_workflow_runs_and_embeds_itself(world, name):
    result = run(world, WORKFLOWS / f"{name}.yaml", *SIZES[name], "--set", "seed=5")
    assert result.rc == 0, result.err
    assert set(result.statuses().values()) == {"ran"}
    [png] = world.pngs()
    assert png.name == f"{name if name != 'prompt_sweep' else 'sweep'}_00001_.png"
    assert pixels(png).shape == (64, 64, 3)
    text = png_text(png)
    embedded = json.loads(text["sdgraph"])
    assert embedded["params"]["seed"] == 5 and embedded["params"]["steps"] == 2  # overrides folded in
    comfy = json.loads(text["prompt"])
    sampler = next((n for n in comfy.values() if n["class_type"] == "KSampler"), None)
    if sampler is not None:
        assert sampler["inputs"]["seed"] == 5 and sampler["inputs"]["model"][1] == 0
    else:  # custom sampling: the seed is RandomNoise's
        noise = next(n for n in comfy.values() if n["class_type"] == "RandomNoise")
        assert noise["inputs"]["noise_seed"] == 5


@pytest.mark.slow
def test_prompt_sweep_encodes_the_negative_once(world):
    result = run(world, WORKFLOWS / "prompt_sweep.yaml", *SMALL, "--sweep", "prompt=@prompts.txt",
                 "--sweep", "seed=1,2")
    assert result.rc == 0, result.err
    prompts = [line for line in (WORKFLOWS / "prompts.txt").read_text().splitlines() if line.strip()]
    variations = result.json["variations"]
    assert len(variations) == len(prompts) * 2 == len(world.pngs())
    negative = [result.statuses(i)["negative"] for i in range(len(variations))]
    assert negative[0] == "ran" and set(negative[1:]) == {"memory cache"}
    positive = [result.statuses(i)["positive"] for i in range(len(variations))]
    assert positive.count("ran") == len(prompts)  # the second seed of a prompt reuses its encoding
    embedded = [json.loads(png_text(p)["sdgraph"])["params"] for p in world.pngs()]
    assert [(e["prompt"], e["seed"]) for e in embedded] == [(p, s) for p in prompts for s in (1, 2)]


@pytest.mark.slow
def test_rerunning_an_image_reproduces_it_byte_for_byte(world):
    assert run(world, WORKFLOWS / "txt2img.yaml", *SMALL, "--set", "seed=11").rc == 0
    [first] = world.pngs()
    again = run(world, first, cache=False)  # no cache: really recompute it
    assert again.rc == 0, again.err
    assert set(again.statuses().values()) == {"ran"}
    second = world.output / "txt2img_00002_.png"
    assert second.read_bytes() == first.read_bytes()


@pytest.mark.slow
def test_lora_chain_logs_coverage_and_zero_strength_is_the_plain_checkpoint(world):
    reset_loads()
    shared = [*SMALL, "--set", "seed=3", "--set", "sampler=euler"]
    lora = run(world, WORKFLOWS / "multi_lora.yaml", *shared, as_json=False)
    assert lora.rc == 0, lora.err
    assert "LoRA detail.safetensors: unet" in lora.err and "text encoder" in lora.err
    zero = ["--set", "lora1_strength=0", "--set", "lora1_clip_strength=0", "--set", "lora2_strength=0",
            "--set", "lora2_clip_strength=0", "--set", "prefix=zero"]
    assert run(world, WORKFLOWS / "multi_lora.yaml", *shared, *zero).rc == 0
    plain = run(world, WORKFLOWS / "txt2img.yaml", *shared, "--set", "negative=blurry, low quality",
                "--set", "prompt=a cosy reading nook with plants, warm light, highly detailed",
                "--set", "cfg=7.0", "--set", "prefix=plain")
    assert plain.rc == 0
    by_prefix = {p.name.split("_0")[0]: pixels(p) for p in world.pngs()}
    assert np.array_equal(by_prefix["zero"], by_prefix["plain"])
    assert not np.array_equal(by_prefix["multi_lora"], by_prefix["plain"])
    assert models.LOAD_COUNTS["unet"] == 1  # one process, three recipes: the base UNet loaded once


@pytest.mark.slow
def test_strength_sweep_never_reloads_the_checkpoint(world):
    reset_loads()
    result = run(world, WORKFLOWS / "multi_lora.yaml", *SMALL, "--sweep", "lora2_strength=0,0.5,1")
    assert result.rc == 0, result.err
    assert (models.LOAD_COUNTS["unet"], models.LOAD_COUNTS["clip"], models.LOAD_COUNTS["vae"]) == (1, 1, 1)
    # LoadLoRA has one cache key for both outputs, so the encodings re-run (on the same loaded encoder)
    assert [result.statuses(i)["ckpt"] for i in range(3)] == ["ran", "memory cache", "memory cache"]
    assert len(world.pngs()) == 3


@pytest.mark.slow
def test_demo_then_readme_command_on_a_fresh_folder(tmp_path, monkeypatch):
    """`sdgraph demo` stand-ins make the README's plain command work; a real model is never overwritten."""
    from nodes.demo import make_demo

    monkeypatch.chdir(tmp_path)
    real = tmp_path / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"not really a model, but the user's file")
    import io

    out = io.StringIO()
    written = make_demo("models", "input", image_size=64, out=out)
    assert real.read_bytes() == b"not really a model, but the user's file"
    assert real not in written and "never overwritten" in out.getvalue()
    real.unlink()
    written = make_demo("models", "input", image_size=64, out=out)
    assert written[0] == real.relative_to(tmp_path) and "RANDOM-WEIGHT" in out.getvalue()
    assert make_demo("models", "input", image_size=64, out=out) == []  # nothing left to write
    result = run_cli("run", str(WORKFLOWS / "txt2img.yaml"), *SMALL, "--cache-dir", "cache", "-q")
    assert result.rc == 0, result.err
    assert result.out.strip() == "output/txt2img_00001_.png"


@pytest.mark.slow
@pytest.mark.parametrize("workflow, args", [
    ("txt2img", ["--set", "prompt=a lighthouse at dawn", "--set", "seed=7"]),
    ("txt2img", ["--set", "batch_size=2"]),
    ("txt2img", ["--sweep", "sampler.seed=1,2", "--sweep", f"positive.text=@{WORKFLOWS / 'prompts.txt'}"]),
    ("multi_lora", ["--set", "lora1.strength_model=0.5"]),
    ("prompt_sweep", ["--sweep", "prompt=@prompts.txt"]),
])
def test_the_documented_command_lines_work(world, workflow, args):
    """The override and sweep examples in README.md and in the workflows' comment headers."""
    result = run(world, WORKFLOWS / f"{workflow}.yaml", *SMALL, *args)
    assert result.rc == 0, result.err
    batch = 2 if "batch_size=2" in args else 1
    assert len(world.pngs()) == batch * len(result.json["variations"]) >= 1
