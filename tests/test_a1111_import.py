"""A1111 / Forge / civitai infotexts (hand-written in the shapes those tools write: modules/infotext_utils.py
and processing.py's create_infotext) parse into prompt, negative prompt and settings, and become sdgraph
workflows; images carry them in a PNG `parameters` chunk or a JPEG/WebP EXIF UserComment."""

from __future__ import annotations

import pytest
import yaml
from sd_nodes_testing import make_world, run, run_cli

from graph.declare import get_spec
from graph.errors import ValidationFailed
from graph.importers import load_workflow
from graph.validate import validate
from nodes.a1111_import import sampler_and_scheduler, workflow_from_infotext
from nodes.a1111_infotext import parse_infotext
from nodes.png_workflow import decode_user_comment

FULL = """masterpiece, best quality, 1girl, (red hair:1.2), <lora:detail:0.8>, smile,
looking at viewer, "quoted", a: b
Negative prompt: lowres, bad anatomy, <lora:style:1>
worst quality
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, ENSD: 31337, \
Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent (nearest-exact), \
Lora hashes: "detail: 3a1b, style: 9c0d", ADetailer prompt: "face, \\"smiling\\", eyes", Version: v1.10.1"""


def test_full_infotext_parses_like_a1111():
    info = parse_infotext(FULL)
    assert info.prompt == (
        'masterpiece, best quality, 1girl, (red hair:1.2), , smile,\nlooking at viewer, "quoted", a: b'
    )  # the tag goes, its commas stay (as in A1111)
    assert info.negative == "lowres, bad anatomy, \nworst quality"
    assert info.params["Steps"] == "28" and info.params["Size"] == "512x768"
    assert info.params["Lora hashes"] == "detail: 3a1b, style: 9c0d"  # quoted value with commas
    assert info.params["ADetailer prompt"] == 'face, "smiling", eyes'  # JSON escapes inside quotes
    assert info.params["Version"] == "v1.10.1"
    assert [(lo.name, lo.unet, lo.te) for lo in info.loras] == [("detail", 0.8, 0.8)]
    assert info.other_networks == ["<lora:style:1>"]  # a negative prompt's LoRA is not applied


def test_no_negative_prompt_and_a_prompt_that_looks_like_settings():
    info = parse_infotext(
        "a cat, a dog, a bird\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    )
    assert info.prompt == "a cat, a dog, a bird" and info.negative == ""
    # fewer than three `key: value` pairs on the last line: it is prompt, not settings (A1111's rule)
    info = parse_infotext("portrait: woman, style: oil")
    assert info.prompt == "portrait: woman, style: oil" and info.params == {}


def test_empty_negative_prompt_line():
    info = parse_infotext("a fox\nNegative prompt: \nSteps: 4, Sampler: Euler, Seed: 3, Size: 64x64")
    assert info.prompt == "a fox" and info.negative == "" and info.params["Seed"] == "3"


@pytest.mark.parametrize(
    "tag, unet, te",
    [
        ("<lora:x:0.7>", 0.7, 0.7),
        ("<lora:x:0.5:1.25>", 1.25, 0.5),  # te, then unet
        ("<lora:x>", 1.0, 1.0),
        ("<lora:x:te=0.3:unet=0.9>", 0.9, 0.3),
        ("<lyco:x:0.6>", 0.6, 0.6),
        ("<lora:x:0.8:0.8:dyn=16>", 0.8, 0.8),
    ],
)
def test_lora_tag_forms(tag, unet, te):
    [lora] = parse_infotext(f"a {tag} b\nSteps: 2, Seed: 1, Size: 64x64").loras
    assert (lora.name, lora.unet, lora.te) == ("x", unet, te)


@pytest.mark.parametrize(
    "sampler, schedule, version, expected",
    [
        ("Euler a", None, None, ("euler_ancestral", "normal")),
        ("Euler", "Automatic", (1, 10), ("euler", "normal")),
        ("DPM++ 2M Karras", None, (1, 6), ("dpmpp_2m", "karras")),  # the old labels carry the schedule
        ("DPM++ SDE Karras", None, None, ("dpmpp_sde", "karras")),
        ("DPM++ 2M SDE Exponential", None, (1, 8), ("dpmpp_2m_sde", "exponential")),
        ("DPM++ 2M", "Karras", (1, 10), ("dpmpp_2m", "karras")),
        ("DPM++ 2M", None, (1, 6), ("dpmpp_2m", "normal")),  # before 1.9: uniform
        ("DPM++ 2M", None, (1, 10), ("dpmpp_2m", "karras")),  # 1.9+: "Automatic", the sampler's default
        ("DPM++ 3M SDE", None, (1, 9), ("dpmpp_3m_sde", "exponential")),
        ("DPM2 a", "Uniform", None, ("dpm_2_ancestral", "normal")),
        ("UniPC", "SGM Uniform", None, ("uni_pc", "sgm_uniform")),
        ("DDIM", "DDIM", None, ("ddim", "ddim_uniform")),
        ("LMS", "Exponential", None, ("lms", "exponential")),
        ("PLMS", None, None, ("euler", "normal")),  # not mapped: said in the notes
    ],
)
def test_sampler_names_map_to_comfyui(sampler, schedule, version, expected):
    notes: list[str] = []
    assert sampler_and_scheduler(sampler, schedule, version, notes) == expected
    assert any("not mapped" in n for n in notes) == (sampler == "PLMS")


def test_full_infotext_becomes_a_hires_workflow():
    wf = workflow_from_infotext(FULL)
    validate(wf)
    p, n = wf.params, wf.nodes
    assert p["ckpt"] == "v1-5-pruned-emaonly.safetensors" and p["seed"] == 1234567890 and p["cfg"] == 7.5
    assert (p["width"], p["height"], p["steps"]) == (512, 768, 28)
    assert n["lora1"].inputs["lora_name"] == "detail.safetensors"
    assert n["clip_skip"].inputs["stop_at_clip_layer"] == -2
    assert n["sampler"].inputs["sampler_name"] == "dpmpp_2m" and n["sampler"].inputs["scheduler"] == "karras"
    # int(512 * 1.5) = 768, int(768 * 1.5) = 1152 (multiples of 8); the latent upscaled, sampled again
    assert (p["hires_width"], p["hires_height"], p["hires_steps"], p["denoise"]) == (768, 1152, 10, 0.45)
    assert n["upscale"].inputs["upscale_method"] == "nearest-exact"
    assert n["hires_sampler"].inputs["latent_image"].node == "upscale"
    assert n["decode"].inputs["samples"].node == "hires_sampler"
    # A1111's GPU seeds with its eta noise seed delta, and its prompt weighting, on both passes
    for sampler in ("sampler", "hires_sampler"):
        inputs = n[sampler].inputs
        assert inputs["noise_device"] == "a1111" and inputs["eta_noise_seed_delta"] == 31337
    assert n["positive"].inputs["weighting"] == "a1111" and n["negative"].inputs["weighting"] == "a1111"
    assert not any("ENSD" in note for note in wf.notes)
    assert 'not mapped: ADetailer prompt: face, "smiling", eyes' in wf.notes
    assert "not mapped: <lora:style:1> (removed from the prompt)" in wf.notes
    assert not any("Lora hashes" in note or "Model hash" in note for note in wf.notes)  # informational
    assert not any(note.startswith("prompt weights such as (word:1.2)") for note in wf.notes)  # A1111's now


def test_plain_txt2img_without_hires():
    wf = workflow_from_infotext(
        "a fox\nSteps: 4, Sampler: Euler a, CFG scale: 6, Seed: 9, Size: 640x448, "
        "Clip skip: 1, Model: sub/my model"
    )
    validate(wf)
    assert "clip_skip" not in wf.nodes and "hires_sampler" not in wf.nodes
    assert wf.params["ckpt"] == "sub/my model.safetensors" and wf.params["negative"] == ""
    assert wf.nodes["decode"].inputs["samples"].node == "sampler"


def test_hires_resize_and_steps_default():
    wf = workflow_from_infotext(
        "a\nSteps: 12, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
        "Hires resize: 1024x0, Hires upscaler: Latent"
    )
    assert (wf.params["hires_width"], wf.params["hires_height"], wf.params["hires_steps"]) == (1024, 1024, 12)
    assert wf.nodes["upscale"].inputs["upscale_method"] == "bilinear"
    assert wf.nodes["upscale"].inputs["crop"] == "disabled"
    both = workflow_from_infotext(
        "a\nSteps: 12, Sampler: Euler, Seed: 1, Size: 512x768, Denoising strength: 0.5, "
        "Hires resize: 1024x1024"
    )
    assert (both.params["hires_width"], both.params["hires_height"]) == (1024, 1024)
    assert both.nodes["upscale"].inputs["crop"] == "center"  # A1111 scales to cover, then crops
    tall = workflow_from_infotext("a\nSteps: 2, Sampler: Euler, Seed: 1, Size: 512x768, Hires resize: 0x1000")
    assert (tall.params["hires_width"], tall.params["hires_height"]) == (664, 1000)  # 1000 * 512 // 768 = 666


def test_model_upscalers_are_reported_when_their_nodes_are_missing():
    wf = workflow_from_infotext(
        "a\nSteps: 12, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
        "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, VAE: vae-ft-mse-840000-ema-pruned"
    )
    validate(wf)
    if any(get_spec(t) is None for t in ("UpscaleModelLoader", "ImageUpscaleWithModel", "ImageScale")):
        assert any(n.startswith("not mapped: Hires upscaler 'R-ESRGAN 4x+'") for n in wf.notes)
        assert wf.nodes["upscale"].type == "LatentUpscale"
    else:
        assert wf.nodes["upscale_model"].inputs["model_name"] == "R-ESRGAN 4x+.pth"
    if get_spec("VAELoader") is None:
        assert any(n.startswith("not mapped: VAE 'vae-ft-mse-840000-ema-pruned'") for n in wf.notes)
    else:
        assert wf.nodes["vae"].inputs["vae_name"] == "vae-ft-mse-840000-ema-pruned.safetensors"


def test_hires_prompts_and_rng():
    wf = workflow_from_infotext(
        "a\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, "
        'Hires prompt: "a, sharp", Hires negative prompt: "", RNG: CPU'
    )
    validate(wf)
    assert wf.nodes["hires_positive"].inputs["text"] == "a, sharp" and "hires_negative" not in wf.nodes
    assert wf.nodes["hires_sampler"].inputs["positive"].node == "hires_positive"
    assert wf.nodes["hires_sampler"].inputs["negative"].node == "negative"
    assert any(n.startswith("RNG: CPU: the starting noise is ComfyUI's") for n in wf.notes)
    assert wf.nodes["hires_sampler"].inputs["noise_device"] == "cpu"
    assert wf.nodes["hires_positive"].inputs["weighting"] == "a1111"
    assert any(n.startswith("RNG: GPU") for n in workflow_from_infotext(FULL).notes)


def test_model_upscaler_wiring_once_the_nodes_exist(monkeypatch):
    """With UpscaleModelLoader / ImageUpscaleWithModel / ImageScale registered (other node families add
    them), the hires pass decodes, upscales with the model, resizes to the target and encodes again."""
    import nodes.a1111_import as a1111

    real = a1111.get_spec
    later = {"UpscaleModelLoader", "ImageUpscaleWithModel", "ImageScale", "VAELoader"}
    monkeypatch.setattr(a1111, "get_spec", lambda t: object() if t in later else real(t))
    data, notes = a1111._build(
        parse_infotext(
            "a\nSteps: 12, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
            "Hires upscale: 2, Hires upscaler: 4x-UltraSharp, VAE: vae-ft-mse-840000-ema-pruned.ckpt"
        )
    )
    n = data["nodes"]
    assert n["vae"] == {"type": "VAELoader", "vae_name": "vae-ft-mse-840000-ema-pruned.ckpt"}
    assert n["first_decode"]["samples"] == {"from": "sampler.LATENT"} and n["first_decode"]["vae"] == {
        "from": "vae.VAE"
    }
    assert n["upscale_model"] == {"type": "UpscaleModelLoader", "model_name": "4x-UltraSharp.pth"}
    assert n["model_upscale"]["image"] == {"from": "first_decode.IMAGE"}
    assert n["resize"]["image"] == {"from": "model_upscale.IMAGE"} and n["resize"]["width"] == "$hires_width"
    assert n["hires_encode"]["pixels"] == {"from": "resize.IMAGE"}
    assert n["hires_sampler"]["latent_image"] == {"from": "hires_encode.LATENT"}
    assert "upscale" not in n and not any(note.startswith("not mapped: Hires") for note in notes)


def test_img2img_infotext_says_the_source_is_missing():
    wf = workflow_from_infotext(
        "a\nSteps: 12, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.5"
    )
    assert any("img2img" in n for n in wf.notes)


def test_forge_infotext():
    text = (
        "score_9, a lighthouse\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 42, Size: 832x1216, "
        "Model hash: 6ce0161689, Model: juggernaut_v9, "
        "Module 1: sdxl_vae, Beta schedule alpha: 0.6, Version: f2.0.1v1.10.1-previous-313-g8a042934"
    )
    wf = workflow_from_infotext(text)
    assert wf.nodes["sampler"].inputs["scheduler"] == "normal"
    assert "not mapped: Beta schedule alpha: 0.6" in wf.notes
    assert "not mapped: Module 1: sdxl_vae" in wf.notes


def test_an_infotext_with_nothing_in_it_is_an_error():
    with pytest.raises(ValidationFailed, match="neither a prompt nor settings"):
        workflow_from_infotext("   \n ")


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"UNICODE\x00" + "caf\u00e9, Steps: 2".encode("utf-16-be"), "caf\u00e9, Steps: 2"),
        (b"UNICODE\x00" + "caf\u00e9, Steps: 2".encode("utf-16-le"), "caf\u00e9, Steps: 2"),
        (b"UNICODE\x00" + "caf\u00e9".encode("utf-16"), "caf\u00e9"),  # with a byte-order mark
        (b"ASCII\x00\x00\x00Steps: 2", "Steps: 2"),
        (b"\x00" * 8 + "caf\u00e9".encode("utf-8"), "caf\u00e9"),
    ],
)
def test_exif_user_comment_charsets(raw, text):
    assert decode_user_comment(raw) == text


SMALL_INFOTEXT = (
    "a red fox in the snow, <lora:detail:0.7>\nNegative prompt: blurry\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 77, Size: 64x64, "
    "Model: v1-5-pruned-emaonly, Clip skip: 2, Denoising strength: 0.6, Hires upscale: 1.5, "
    "Hires steps: 1, Hires upscaler: Latent, Face restoration: CodeFormer, Version: v1.10.1"
)


def _image(path, fmt: str):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    img = Image.new("RGB", (16, 16), (90, 120, 200))
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("parameters", SMALL_INFOTEXT)
        img.save(path, pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + SMALL_INFOTEXT.encode("utf-16-be")
        img.save(path, fmt, exif=exif)
    return path


@pytest.mark.parametrize("name, fmt", [("civitai.png", "PNG"), ("a1111.jpg", "JPEG"), ("forge.webp", "WEBP")])
def test_images_carry_the_infotext(tmp_path, name, fmt):
    wf = load_workflow(_image(tmp_path / name, fmt))
    assert wf.params["prompt"] == "a red fox in the snow, " and wf.params["seed"] == 77
    assert wf.nodes["lora1"].inputs["strength_model"] == 0.7


def test_convert_lists_what_was_not_mapped(tmp_path):
    out = tmp_path / "wf.yaml"
    result = run_cli("convert", str(_image(tmp_path / "civitai.png", "PNG")), "-o", str(out))
    assert result.rc == 0, result.err
    assert "note: not mapped: Face restoration: CodeFormer" in result.err
    data = yaml.safe_load(out.read_text())
    assert data["params"]["seed"] == 77 and data["nodes"]["hires_sampler"]["denoise"] == "$denoise"
    assert load_workflow(out).to_data()["nodes"] == data["nodes"]


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


@pytest.mark.slow
def test_a_civitai_png_runs(world, tmp_path):
    result = run(world, _image(tmp_path / "civitai.png", "PNG"))
    assert result.rc == 0, result.err
    [png] = world.pngs()
    from PIL import Image

    assert Image.open(png).size == (96, 96)  # the hires pass ran


@pytest.mark.slow
def test_the_shipped_a1111_example_runs_after_demo(world):
    from sd_nodes_testing import WORKFLOWS

    small = [
        "--set",
        "width=64",
        "--set",
        "height=64",
        "--set",
        "steps=2",
        "--set",
        "hires_width=96",
        "--set",
        "hires_height=96",
        "--set",
        "hires_steps=1",
    ]
    result = run(world, WORKFLOWS / "a1111_hires.png", *small)
    assert result.rc == 0, result.err
    [png] = world.pngs()
    assert png.name == "a1111_00001_.png"
