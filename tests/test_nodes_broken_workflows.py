"""A corpus of broken SD workflows (tests/data/broken/, one file per error kind): `sdgraph run` exits
with status 2, names file:line, node and input, suggests a fix, runs nothing and writes nothing."""

from __future__ import annotations

import pytest
from sd_nodes_testing import DATA, make_world, reset_loads, run

from nodes import models

BROKEN = DATA / "broken"

# file stem: (line, node, input, words the message must contain)
EXPECTED = {
    "unknown_node_type": (14, "decode", None, ["unknown node type 'VAEDecoder'", "did you mean 'VAEDecode'"]),
    "unknown_input": (13, "sampler", "stepz", ["unknown input 'stepz'", "did you mean 'steps'"]),
    "missing_input": (7, "sampler", "latent_image", ["missing required input 'latent_image' (LATENT)"]),
    "wrong_socket_type": (12, "sampler", "latent_image", ["expects LATENT", "is CONDITIONING",
                                                          "{from: latent.LATENT}"]),
    "out_of_range": (14, "sampler", "denoise", ["1.5 is above the maximum 1.0"]),
    "wrong_literal_type": (13, "sampler", "steps", ["expected an integer"]),
    "literal_for_socket": (9, "sampler", "model", ["expects a link from a MODEL output",
                                                   "{from: ckpt.MODEL}"]),
    "bad_choice": (14, "sampler", "sampler_name", ["'eulr' is not one of", "did you mean 'euler'"]),
    "not_multiple_of_8": (6, "latent", "width", ["not a multiple of 8", "try 64 or 72"]),
    "dangling_link": (14, "decode", "samples", ["unknown node 'samplr'", "did you mean 'sampler'"]),
    "cycle": (14, "upscale", None, ["cycle: sampler -> upscale -> sampler"]),
    "duplicate_id": (6, "positive", None, ["duplicate node id 'positive'", "first defined on line 4"]),
    "no_output_node": (2, None, None, ["no output node", "SaveImage"]),
    "missing_model_file": (3, "ckpt", "ckpt_name", ["checkpoint 'v1-5-pruned.safetensors' not found",
                                                    "available there: ", "v1-5-pruned-emaonly.safetensors"]),
    "missing_lora_file": (4, "lora", "lora_name", ["LoRA 'sharp.safetensors' not found",
                                                   "detail.safetensors, style.safetensors"]),
    "missing_image_file": (6, "image", "image", ["image 'holiday.png' not found",
                                                 "available there: example.png"]),
}


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


def test_the_corpus_has_one_file_per_expectation():
    assert {p.stem for p in BROKEN.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_workflow_is_refused_before_anything_runs(world, name):
    line, node, inp, words = EXPECTED[name]
    reset_loads()
    path = BROKEN / f"{name}.yaml"
    result = run(world, path, as_json=False)
    assert result.rc == 2, result.err
    first = result.err.splitlines()[0]
    assert first.startswith(f"{path}:{line}: "), first
    if node is not None:
        assert f"node '{node}'" + (f" input '{inp}'" if inp else "") + ": " in first
    for word in words:
        assert word in first
    assert "nothing was run" in result.err
    assert not world.output.exists() or not any(world.output.iterdir())
    assert not models.LOAD_COUNTS


def test_json_mode_reports_the_location(world):
    result = run(world, BROKEN / "bad_choice.yaml")
    assert result.rc == 2
    [error] = result.json["errors"]
    assert (error["line"], error["node"], error["input"]) == (14, "sampler", "sampler_name")
