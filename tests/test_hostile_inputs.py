"""Hostile and odd workflow inputs (issue 21, item 5): alias bombs, deep nesting, long node chains, huge
integers, plans too large for the machine, decompression-bomb images, non-finite values, huge prompts.
Each must end in a clear error (exit 2 for invalid input, 1 for a failed node) within bounded memory and
time, never a traceback. The CLI runs in a child process under an address-space limit and a timeout, so
a regression is a failed test, not a machine out of memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sd_nodes_testing import REPO, make_world

LIMIT_AS = 6 << 30  # bytes of address space for each child (MLX maps a lot; real use stays far below)
TIMEOUT = 120

_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


def cli(*args, limit: int = LIMIT_AS, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    child_env = dict(os.environ) | {"PYTHONPATH": str(REPO)} | (env or {})
    try:
        return subprocess.run([sys.executable, "-c", _CHILD.format(limit=limit), *map(str, args)],
                              capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=child_env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sdgraph {' '.join(map(str, args))[:200]} ran past {TIMEOUT} s")


def run(world, path, *extra, cache=False) -> subprocess.CompletedProcess:
    return cli("run", path, *world.folder_args(cache), *extra)


def assert_clear_error(result, rc: int = 2, *words: str) -> None:
    assert result.returncode == rc, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in result.stderr, result.stderr[-3000:]


TXT2IMG = """\
params:
  ckpt: v1-5-pruned-emaonly.safetensors
  prompt: a castle
  seed: 1
  steps: 1
  width: 64
  height: 64
  batch_size: 1
nodes:
  ckpt:     {type: LoadCheckpoint, ckpt_name: $ckpt}
  positive: {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: $prompt}
  negative: {type: CLIPEncode, clip: {from: ckpt.CLIP}, text: ""}
  latent:   {type: EmptyLatent, width: $width, height: $height, batch_size: $batch_size}
  sampler:
    type: KSampler
    model: {from: ckpt.MODEL}
    positive: {from: positive.CONDITIONING}
    negative: {from: negative.CONDITIONING}
    latent_image: {from: latent.LATENT}
    seed: $seed
    steps: $steps
  decode:   {type: VAEDecode, samples: {from: sampler.LATENT}, vae: {from: ckpt.VAE}}
  save:     {type: SaveImage, images: {from: decode.IMAGE}, filename_prefix: out}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- 1. YAML alias bombs ----------------------------------------------------------------------------

def laughs(levels: int = 9, width: int = 10) -> list[str]:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return lines


BOMB = {
    "unused_param": lambda: "params:\n" + "".join(f"  {line}\n" for line in laughs())
    + TXT2IMG.split("params:\n", 1)[1],
    "top_level_keys": lambda: "".join(f"{line}\n" for line in laughs()) + TXT2IMG,
    "prompt": lambda: TXT2IMG.replace("  prompt: a castle\n", "  prompt: &p0 lollollollollollollollol\n"
                                      + "".join(f"  p{i}: &p{i} [" + ", ".join([f"*p{i - 1}"] * 10) + "]\n"
                                                for i in range(1, 9))).replace("text: $prompt", "text: $p8"),
    "unknown_input": lambda: "params:\n" + "".join(f"  {line}\n" for line in laughs())
    + TXT2IMG.split("params:\n", 1)[1].replace("seed: $seed", "seed: $seed\n    bomb: $a8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", sorted(BOMB))
@pytest.mark.parametrize("command", ["run", "validate", "convert"])
def test_yaml_alias_bomb_is_refused(world, tmp_path, where, command):
    path = write(tmp_path, "bomb.yaml", BOMB[where]())
    if command == "run":
        result = run(world, path)
    elif command == "validate":
        result = cli("validate", path, *world.folder_args(False)[:4])
    else:
        result = cli("convert", path, "-o", tmp_path / "bomb.json")
    assert_clear_error(result, 2, "alias", "bomb.yaml")


# ---- 2. deep nesting and long chains ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "levels"), [  # yaml at 100,000 levels takes ~3.5 s: the slow tier
    ("json", 1_000), ("json", 100_000), ("yaml", 1_000),
    pytest.param("yaml", 100_000, marks=pytest.mark.slow)])
def test_deeply_nested_document_is_refused(world, tmp_path, levels, fmt):
    deep = "[" * levels + "]" * levels
    if fmt == "json":
        text = json.dumps({"params": {"deep": "X"}, "nodes": {}}).replace('"X"', deep)
    else:
        text = "params:\n  deep: " + deep + "\n" + TXT2IMG.split("params:\n", 1)[1]
    path = write(tmp_path, f"deep.{fmt}", text)
    for result in (run(world, path), cli("validate", path), cli("convert", path, "-o", tmp_path / "x.yaml")):
        assert_clear_error(result, 2, "nested deeper than", f"deep.{fmt}")


def chain(length: int) -> str:
    """EmptyLatent -> `length` LatentUpscale nodes that keep the size -> VAEDecode -> SaveImage."""
    lines = ["nodes:", "  ckpt: {type: LoadCheckpoint, ckpt_name: v1-5-pruned-emaonly.safetensors}",
             "  n0: {type: EmptyLatent, width: 64, height: 64}"]
    lines += [f"  n{i}: {{type: LatentUpscale, samples: {{from: n{i - 1}.LATENT}}, width: 0, height: 0}}"
              for i in range(1, length + 1)]
    lines += [f"  decode: {{type: VAEDecode, samples: {{from: n{length}.LATENT}}, vae: {{from: ckpt.VAE}}}}",
              "  save: {type: SaveImage, images: {from: decode.IMAGE}, filename_prefix: chain}"]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "length"), [  # all but json at 1,000 nodes take 4-16 s: the slow tier
    pytest.param("yaml", 1_000, marks=pytest.mark.slow), pytest.param("yaml", 5_000, marks=pytest.mark.slow),
    ("json", 1_000), pytest.param("json", 5_000, marks=pytest.mark.slow)])
def test_long_chain_of_nodes_runs(world, tmp_path, length, fmt):
    import yaml

    text = chain(length)
    if fmt == "json":
        text = json.dumps(yaml.safe_load(text))
    path = write(tmp_path, f"chain.{fmt}", text)
    result = run(world, path, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(world.pngs()) == 1


# ---- 3. integers too long for Python's int() --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["steps", "seed"])
@pytest.mark.parametrize("fmt", ["yaml", "json", "set"])
def test_5000_digit_integer_is_a_range_error(world, tmp_path, name, fmt):
    huge = "9" * 5000
    if fmt == "yaml":
        path = write(tmp_path, "huge.yaml", TXT2IMG.replace(f"  {name}: 1\n", f"  {name}: {huge}\n"))
        result = run(world, path)
    elif fmt == "json":
        import yaml

        data = yaml.safe_load(TXT2IMG)
        data["params"][name] = 0
        path = write(tmp_path, "huge.json", json.dumps(data).replace(f'"{name}": 0', f'"{name}": {huge}'))
        result = run(world, path)
    else:
        result = run(world, write(tmp_path, "ok.yaml", TXT2IMG), "--set", f"{name}={huge}")
    assert_clear_error(result, 2, "a 5000-digit integer is above the maximum", f"input '{name}'")
    assert len(result.stderr) < 2000


# ---- 6. prompts: non-finite weights, deep nesting, 5 million characters ----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("prompt, words", [
    ("a (castle:nan)", ["is not a finite number"]),
    ("a (castle:inf) at dawn", ["is not a finite number"]),
    ("(castle:-inf)", ["is not a finite number"]),
    ("(" * 5000 + "castle" + ")" * 5000, ["deeper than"]),
])
def test_bad_prompt_is_refused_at_validation(world, tmp_path, prompt, words):
    text = TXT2IMG.replace("prompt: a castle", f"prompt: {json.dumps(prompt)}")
    path = write(tmp_path, "prompt.yaml", text)
    result = run(world, path)
    assert_clear_error(result, 2, "node 'positive' input 'text'", *words)
    assert not world.pngs()


@pytest.mark.slow  # ~11 s here
def test_5_million_character_prompt_is_refused_quickly(world, tmp_path):
    import time

    path = write(tmp_path, "long.yaml", TXT2IMG.replace("prompt: a castle", "prompt: " + "castle " * 714_286))
    start = time.perf_counter()
    result = run(world, path)
    assert_clear_error(result, 2, "node 'positive' input 'text'", "characters (at most")
    assert time.perf_counter() - start < 60


def test_chunking_a_long_token_group_is_linear():
    import time

    from sd.text.encode import chunk_token_groups

    group = [(320, 1.0)] * 1_000_000  # one weighted segment of a million tokens
    start = time.perf_counter()
    chunks = chunk_token_groups([group])
    assert time.perf_counter() - start < 3
    assert len(chunks) == -(-1_000_000 // 75)
    assert all(len(c) == 77 for c in chunks)


# ---- 4. plans too large for the machine, images claiming huge sizes --------------------------------

@pytest.mark.slow
def test_16384_square_image_is_refused_before_running(world, tmp_path):
    path = write(tmp_path, "big.yaml", TXT2IMG)
    result = run(world, path, "--set", "width=16384", "--set", "height=16384")
    assert_clear_error(result, 2, "node 'sampler'", "KSampler needs at least", "GiB of memory",
                       "16384x16384", "this machine has")
    assert "loaded" not in result.stderr and not world.pngs()
    ok = run(world, path, "--quiet")  # the same plan at 64x64 is let through
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(world.pngs()) == 1


@pytest.mark.slow
def test_batch_of_4096_is_refused_before_running(world, tmp_path):
    path = write(tmp_path, "batch.yaml", TXT2IMG)
    result = run(world, path, "--set", "batch_size=4096")
    assert_clear_error(result, 2, "needs at least", "this machine has", "4096")
    assert "loaded" not in result.stderr and not world.pngs()


@pytest.mark.slow
def test_validate_refuses_a_plan_too_large_too(world, tmp_path):
    path = write(tmp_path, "big.yaml", TXT2IMG)
    result = cli("validate", path, *world.folder_args(False)[:4],
                 "--set", "width=16384", "--set", "height=16384")
    assert_clear_error(result, 2, "node 'sampler'", "needs at least")


def png_claiming(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid RGB PNG of width x height zeros (compressed to little), or with `rows` only the first rows
    of its data (a truncated file: only its header is honest)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


EMPTY = "  latent:   {type: EmptyLatent, width: $width, height: $height, batch_size: $batch_size}"
IMG2IMG = TXT2IMG.replace(EMPTY,
                          "  load:     {type: LoadImage, image: bomb.png}\n"
                          "  latent:   {type: VAEEncode, pixels: {from: load.IMAGE}, vae: {from: ckpt.VAE}}")


def input_with(world, tmp_path, png: bytes):
    import shutil

    folder = tmp_path / "input"
    shutil.copytree(world.input, folder)
    (folder / "bomb.png").write_bytes(png)
    return ["--input-dir", folder]


@pytest.mark.slow
def test_tiny_png_claiming_8000_square_is_refused_before_decoding(world, tmp_path):
    png = png_claiming(8000, 8000)
    assert len(png) < 1_000_000
    extra = input_with(world, tmp_path, png)
    result = run(world, write(tmp_path, "i2i.yaml", IMG2IMG), *extra)
    assert_clear_error(result, 2, "node 'latent'", "VAEEncode needs at least", "8000x8000",
                       "this machine has")
    assert "loaded" not in result.stderr


@pytest.mark.slow
def test_png_claiming_more_than_16384_a_side_is_refused_at_validation(world, tmp_path):
    extra = input_with(world, tmp_path, png_claiming(20000, 3000, rows=10))
    result = run(world, write(tmp_path, "i2i.yaml", IMG2IMG), *extra)
    assert_clear_error(result, 2, "node 'load'", "20000x3000 pixels; at most 16384")


# ---- 5. non-finite weights: the node that made the NaNs fails, naming the file -----------------------

def models_with(world, tmp_path, poison: str):
    """A copy of the models folder where the checkpoint's UNet ('checkpoint') or a LoRA ('lora') is not
    finite."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "models"
    shutil.copytree(world.models, folder)
    if poison == "checkpoint":
        path = folder / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
        tensors = load_file(path)
        key = next(k for k in sorted(tensors) if k.startswith("model.diffusion_model.") and
                   k.endswith("weight") and tensors[k].dtype.kind == "f")
        tensors[key] = np.full_like(tensors[key], np.nan)
    else:
        path = folder / "loras" / "detail.safetensors"
        tensors = {k: np.full_like(v, np.inf) if v.dtype.kind == "f" and v.ndim >= 2 else v
                   for k, v in load_file(path).items()}
    save_file(tensors, str(path))
    return ["--models-dir", folder], path


@pytest.mark.slow
def test_nan_weights_in_the_checkpoint_fail_the_sampler_naming_the_file(world, tmp_path):
    extra, path = models_with(world, tmp_path, "checkpoint")
    result = run(world, write(tmp_path, "t2i.yaml", TXT2IMG), *extra)
    assert_clear_error(result, 1, "sampler", "NaN or Inf", str(path), "non-finite UNet weights")
    assert not world.pngs()


@pytest.mark.slow
def test_non_finite_lora_fails_naming_the_lora(world, tmp_path):
    extra, path = models_with(world, tmp_path, "lora")
    lora = ("  lora: {type: LoadLoRA, model: {from: ckpt.MODEL}, clip: {from: ckpt.CLIP}, "
            "lora_name: detail.safetensors, strength_model: 1.0, strength_clip: 0.0}\n")
    text = TXT2IMG.replace("  positive:", lora + "  positive:", 1)
    text = text.replace("model: {from: ckpt.MODEL}\n    positive", "model: {from: lora.MODEL}\n    positive")
    result = run(world, write(tmp_path, "lora.yaml", text), *extra)
    assert_clear_error(result, 1, "NaN or Inf", str(path))
    assert not world.pngs()


# ---- 6. `sdgraph validate` reads file headers: a broken model file fails before anything runs ---------

def _broken_models(world, tmp_path, how: str) -> tuple[list, Path]:
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(world.models, folder)
    name = "loras/detail.safetensors" if how == "lora" else "checkpoints/v1-5-pruned-emaonly.safetensors"
    path = folder / name
    data = path.read_bytes()
    if how in ("truncated", "lora"):
        path.write_bytes(data[: len(data) // 2])
    elif how == "text":
        path.write_text("<html>403 Forbidden</html>\n")  # what a failed download often leaves
    elif how == "sdxl":
        import numpy as np
        from safetensors.numpy import save_file
        save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":
                   np.ones(4, np.float32)}, str(path))
    return ["--models-dir", folder], path


@pytest.mark.slow
@pytest.mark.parametrize("how, words", [("truncated", ["file"]), ("text", ["not a checkpoint"]),
                                        ("sdxl", ["SDXL"]), ("lora", ["LoRA"])])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_broken_model_file_is_an_error_before_running(world, tmp_path, how, words, command):
    extra, path = _broken_models(world, tmp_path, how)
    text = TXT2IMG
    if how == "lora":
        lora = ("  lora: {type: LoadLoRA, model: {from: ckpt.MODEL}, clip: {from: ckpt.CLIP}, "
                "lora_name: detail.safetensors}\n")
        text = text.replace("  positive:", lora + "  positive:", 1)
        text = text.replace("model: {from: ckpt.MODEL}\n    positive",
                            "model: {from: lora.MODEL}\n    positive")
    wf = write(tmp_path, "t2i.yaml", text)
    if command == "validate":
        result = cli("validate", wf, *extra)
    else:
        result = run(world, wf, *extra)
    assert_clear_error(result, 2, str(path), "lora_name" if how == "lora" else "ckpt_name", *words)
    assert "sampler" not in result.stdout and not world.pngs()
