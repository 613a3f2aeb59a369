"""Turn an A1111 / Forge / civitai infotext into an sdgraph workflow (`sdgraph run civitai.png`).

txt2img as A1111 runs it: checkpoint (`Model`), LoRAs from `<lora:...>` tags, `Clip skip`, the prompts,
a latent of `Size`, one KSampler (`Steps`, `Sampler` + `Schedule type`, `CFG scale`, `Seed`), and, with
`Hires upscale`/`Hires resize`, a second pass: the latent upscaled (latent upscalers) or the image
upscaled by a model / resized (when those node types exist), then sampled again with `Denoising
strength`. Every setting that changes the image but has no equivalent is listed in the workflow's notes.
Prompts are read with A1111's weighting (CLIPEncode weighting a1111) and the seed gives A1111's noise
(KSampler noise_device a1111: its GPU seeds, with ENSD; cpu for `RNG: CPU`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from graph.declare import get_spec
from graph.errors import Problem, ValidationFailed
from graph.workflow import SourceMap, Workflow, workflow_from_data
from nodes.a1111_infotext import Infotext, parse_infotext, size

SAMPLERS = {  # A1111 label -> ComfyUI sampler_name
    "euler": "euler", "euler a": "euler_ancestral", "lms": "lms", "heun": "heun", "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral", "dpm++ 2s a": "dpmpp_2s_ancestral", "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde", "dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm++ 2m sde gpu": "dpmpp_2m_sde", "dpm++ sde gpu": "dpmpp_sde", "dpm++ 3m sde gpu": "dpmpp_3m_sde",
    "dpm fast": "dpm_fast", "dpm adaptive": "dpm_adaptive", "lcm": "lcm", "ddim": "ddim",
    "uni_pc": "uni_pc", "unipc": "uni_pc", "ddpm": "ddpm", "deis": "deis", "ipndm": "ipndm",
    "ipndm_v": "ipndm_v", "heun++ 2": "heunpp2", "restart": "restart", "euler cfg++": "euler_cfg_pp",
    "euler a cfg++": "euler_ancestral_cfg_pp", "dpm++ 2m cfg++": "dpmpp_2m_cfg_pp",
}
SCHEDULES = {  # A1111 "Schedule type" -> ComfyUI scheduler
    "uniform": "normal", "normal": "normal", "karras": "karras", "exponential": "exponential",
    "sgm uniform": "sgm_uniform", "simple": "simple", "ddim": "ddim_uniform", "beta": "beta",
    "kl optimal": "kl_optimal", "align your steps": "align_your_steps", "polyexponential": "polyexponential",
}
# A1111 >= 1.9 "Automatic": the sampler's own default schedule (modules/sd_samplers_kdiffusion.py)
AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_ancestral": "karras",
             "dpmpp_2m_sde": "exponential", "dpmpp_3m_sde": "exponential"}
LATENT_UPSCALERS = {  # A1111 hires latent upscaler -> LatentUpscale method (antialiasing has no twin)
    "latent": "bilinear", "latent (antialiased)": "bilinear", "latent (bicubic)": "bicubic",
    "latent (bicubic antialiased)": "bicubic", "latent (nearest)": "nearest-exact",
    "latent (nearest-exact)": "nearest-exact",
}
PIXEL_UPSCALERS = {"lanczos": "lanczos", "nearest": "nearest-exact"}
USED = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Clip skip", "VAE",
        "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler", "Hires resize",
        "Hires sampler", "Hires schedule type", "Hires CFG Scale", "Hires prompt", "Hires negative prompt",
        "RNG", "ENSD"}
# what identifies files or tools but does not change the image (A1111 writes most other keys only when
# they differ from its defaults, so those are reported)
INFORMATIONAL = {"Model hash", "VAE hash", "Lora hashes", "TI hashes", "Hashes", "Version",
                 "Hires upscaler hash", "Civitai resources", "Civitai metadata", "Created Date"}
DEFAULT_CKPT = "v1-5-pruned-emaonly.safetensors"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _file(name: str, default_ext: str = ".safetensors") -> str:
    name = name.strip().replace("\\", "/")
    return name if name.lower().endswith(MODEL_SUFFIXES) else name + default_ext


def _choice(node_type: str, input_name: str) -> tuple[str, ...]:
    spec = get_spec(node_type)
    inp = spec.inputs.get(input_name) if spec else None
    return tuple(getattr(inp.type, "options", ()) or ()) if inp else ()


def sampler_and_scheduler(sampler: str, schedule: str | None, version: tuple[int, int] | None,
                          notes: list[str]) -> tuple[str, str]:
    """ComfyUI's names for an A1111 sampler label (old labels carry the schedule: "DPM++ 2M Karras")."""
    label = sampler.strip().lower()
    embedded = None
    for suffix in ("karras", "exponential", "polyexponential", "sgm uniform"):
        if label.endswith(" " + suffix) and label[: -len(suffix) - 1] in SAMPLERS:
            label, embedded = label[: -len(suffix) - 1], suffix
    ours = SAMPLERS.get(label)
    known = _choice("KSampler", "sampler_name")
    if ours not in known:
        notes.append(f"not mapped: Sampler '{sampler}' (sdgraph has no such sampler); used euler")
        ours = "euler"
    wanted = (schedule or "").strip().lower() or embedded
    if wanted in (None, "", "automatic"):
        newer = version is not None and version >= (1, 9)
        scheduler = AUTOMATIC.get(ours, "normal") if newer else "normal"
        if wanted == "automatic" or newer:
            notes.append(f"Schedule type Automatic: used {scheduler}, A1111's default for {sampler}")
    else:
        scheduler = SCHEDULES.get(wanted, wanted)
    if scheduler not in _choice("KSampler", "scheduler"):
        notes.append(f"not mapped: Schedule type '{schedule or embedded}' (sdgraph has no such scheduler); "
                     "used normal")
        scheduler = "normal"
    return ours, scheduler


def _version(params: dict[str, str]) -> tuple[int, int] | None:
    """A1111's version ("v1.10.1", Forge's "f2.0.1v1.10.1-previous-...")."""
    found = re.findall(r"v(\d+)\.(\d+)", params.get("Version", ""))
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def _number(params: dict[str, str], key: str, kind, default, notes: list[str]):
    if key not in params:
        return default
    try:
        return kind(float(params[key])) if kind is int else kind(params[key])
    except ValueError:
        notes.append(f"not mapped: {key} '{params[key]}' is not a number; used {default}")
        return default


def workflow_from_infotext(text: str, filename: str | None = None) -> Workflow:
    info = parse_infotext(text)
    if not info.prompt and not info.params:
        raise ValidationFailed([Problem("the A1111 'parameters' text holds neither a prompt nor settings",
                                        filename)])
    data, notes = _build(info)
    wf = workflow_from_data(data, SourceMap(filename))
    wf.notes = notes
    return wf


def _noise_inputs(p: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """KSampler's noise_device (and eta noise seed delta) for A1111's RNG setting."""
    if p.get("RNG", "").strip().upper() == "CPU":
        if p.get("ENSD", "").strip() not in ("", "0"):
            notes.append(f"not mapped: ENSD: {p['ENSD']} (only with A1111's GPU seeds)")
        return {"noise_device": "cpu"}
    inputs: dict[str, Any] = {"noise_device": "a1111"}
    delta = _number(p, "ENSD", int, 0, notes)
    if delta:
        inputs["eta_noise_seed_delta"] = delta
    return inputs


def _build(info: Infotext) -> tuple[dict, list[str]]:
    p, notes = info.params, []
    version = _version(p)
    width, height = size(p.get("Size", "")) or (512, 512)
    if width % 8 or height % 8:
        notes.append(f"Size {width}x{height} rounded down to multiples of 8")
        width, height = max(16, width // 8 * 8), max(16, height // 8 * 8)
    sampler, scheduler = sampler_and_scheduler(p.get("Sampler", "Euler"), p.get("Schedule type"), version,
                                               notes)
    params: dict[str, Any] = {
        "ckpt": _file(p["Model"]) if p.get("Model") else DEFAULT_CKPT,
        "prompt": info.prompt, "negative": info.negative,
        "seed": _number(p, "Seed", int, 0, notes), "steps": _number(p, "Steps", int, 20, notes),
        "cfg": _number(p, "CFG scale", float, 7.0, notes), "width": width, "height": height,
    }
    if p.get("Model"):
        notes.append(f"checkpoint file taken as '{params['ckpt']}' from Model: {p['Model']} (--set ckpt=... "
                     "to use another)")
    nodes: dict[str, dict] = {"ckpt": {"type": "CheckpointLoaderSimple", "ckpt_name": "$ckpt"}}
    model, clip = "ckpt.MODEL", "ckpt.CLIP"
    for i, lora in enumerate(info.loras, 1):
        nodes[f"lora{i}"] = {"type": "LoraLoader", "model": {"from": model}, "clip": {"from": clip},
                             "lora_name": _file(lora.name), "strength_model": lora.unet,
                             "strength_clip": lora.te}
        model, clip = f"lora{i}.MODEL", f"lora{i}.CLIP"
    clip_skip = _number(p, "Clip skip", int, 1, notes)
    if clip_skip > 1:
        nodes["clip_skip"] = {"type": "CLIPSetLastLayer", "clip": {"from": clip},
                              "stop_at_clip_layer": -clip_skip}
        clip = "clip_skip.CLIP"
    vae = "ckpt.VAE"
    if p.get("VAE") and p["VAE"].strip().lower() not in ("none", "automatic"):
        if get_spec("VAELoader") is not None:
            nodes["vae"] = {"type": "VAELoader", "vae_name": _file(p["VAE"])}
            vae = "vae.VAE"
        else:
            notes.append(f"not mapped: VAE '{p['VAE']}' (no VAELoader node yet); the checkpoint's VAE is "
                         "used")
    # A1111's weighting (sd/text/a1111_weights.py) and, unless it drew on the CPU, its GPU seeds
    nodes["positive"] = {"type": "CLIPTextEncode", "clip": {"from": clip}, "text": "$prompt",
                         "weighting": "a1111"}
    nodes["negative"] = {"type": "CLIPTextEncode", "clip": {"from": clip}, "text": "$negative",
                         "weighting": "a1111"}
    nodes["latent"] = {"type": "EmptyLatentImage", "width": "$width", "height": "$height", "batch_size": 1}
    sampling = {"model": {"from": model}, "positive": {"from": "positive.CONDITIONING"},
                "negative": {"from": "negative.CONDITIONING"}, "seed": "$seed", "steps": "$steps",
                "cfg": "$cfg", "sampler_name": sampler, "scheduler": scheduler, **_noise_inputs(p, notes)}
    nodes["sampler"] = {"type": "KSampler", **sampling, "latent_image": {"from": "latent.LATENT"},
                        "denoise": 1.0}
    final = "sampler.LATENT"
    hires = _hires(p, width, height, notes)
    if hires is not None:
        final = _add_hires(nodes, params, sampling, hires, vae, p, version, notes)
    elif "Denoising strength" in p:
        notes.append("not mapped: Denoising strength without hires fix (an img2img image; its source image "
                     "is not in the file): made a txt2img workflow")
    nodes["decode"] = {"type": "VAEDecode", "samples": {"from": final}, "vae": {"from": vae}}
    nodes["save"] = {"type": "SaveImage", "images": {"from": "decode.IMAGE"}, "filename_prefix": "a1111"}

    for tag in info.other_networks:
        notes.append(f"not mapped: {tag} (removed from the prompt)")
    if re.search(r"\[[^\[\]]*:[^\[\]]*\]", info.prompt + info.negative):
        notes.append("not mapped: [a:b:step] prompt editing (read as plain A1111 brackets: weight 1/1.1)")
    if "Batch size" in p and p["Batch size"].strip() not in ("1", ""):
        notes.append(f"not mapped: Batch size {p['Batch size']} (A1111 gives each image its own seed); "
                     "one image")
    for key in p:
        if key not in USED and key not in INFORMATIONAL and key != "Batch size":
            notes.append(f"not mapped: {key}: {p[key]}")
    if p.get("RNG", "").strip().upper() == "CPU":  # torch.randn on the CPU after manual_seed, as ComfyUI
        notes.append("RNG: CPU: the starting noise is ComfyUI's for this seed (noise_device cpu); A1111's "
                     "ancestral/SDE noise still differs, so the image may not match exactly")
    else:
        notes.append(f"RNG: {p.get('RNG', 'GPU')}: A1111's GPU seeds, reproduced with noise_device a1111 "
                     "(torch's CUDA generator; A1111's samplers and schedules may still differ in places)")
    description = "Converted from A1111 / civitai generation parameters"
    return {"description": description, "params": params, "nodes": nodes}, notes


def _hires(p: dict[str, str], width: int, height: int, notes: list[str]) -> tuple[int, int, str] | None:
    """The second pass's size and crop as A1111 computes them (processing.py): int(size * scale); or
    `Hires resize` (one side 0: the other by the aspect ratio; both: scaled to cover, centre-cropped);
    None without hires fix."""
    resize = size(p.get("Hires resize", ""))
    crop = "disabled"
    if resize and any(resize):
        rw, rh = resize
        if rw and rh:
            crop = "center" if rw * height != rh * width else "disabled"
        rw = rw or rh * width // height
        rh = rh or rw * height // width
        target = (rw, rh)
    elif "Hires upscale" in p:
        scale = _number(p, "Hires upscale", float, 1.0, notes)
        target = (int(width * scale), int(height * scale))
    else:
        return None
    return max(64, target[0] // 8 * 8), max(64, target[1] // 8 * 8), crop


def _add_hires(nodes: dict, params: dict, sampling: dict, target: tuple[int, int, str], vae: str,
               p: dict[str, str], version, notes: list[str]) -> str:
    """The hires pass: A1111 passes its steps (`Hires steps`, else Steps) to img2img, which then runs
    them over a schedule of int(steps / strength) (setup_img2img_steps in sd_samplers_common.py) with
    the same seed: what ComfyUI's KSampler does with denoise = strength."""
    params["hires_width"], params["hires_height"], crop = target
    strength = _number(p, "Denoising strength", float, 0.7, notes)
    steps = _number(p, "Hires steps", int, 0, notes) or params["steps"]
    upscaler = p.get("Hires upscaler", "Latent").strip()
    size_inputs = {"width": "$hires_width", "height": "$hires_height", "crop": crop}
    latent = "upscale.LATENT"
    method = LATENT_UPSCALERS.get(upscaler.lower())
    if method is None:
        source = _pixel_upscale(nodes, upscaler, size_inputs, vae, notes)
        if source is None:
            method = "bilinear"
        else:
            nodes["hires_encode"] = {"type": "VAEEncode", "pixels": {"from": source}, "vae": {"from": vae}}
            latent = "hires_encode.LATENT"
    if method is not None:
        if "antialiased" in upscaler.lower():
            notes.append(f"Hires upscaler '{upscaler}': upscaled without antialiasing")
        nodes["upscale"] = {"type": "LatentUpscale", "samples": {"from": "sampler.LATENT"},
                            "upscale_method": method, **size_inputs}
    sampler, scheduler = sampling["sampler_name"], sampling["scheduler"]
    own_sampler = p.get("Hires sampler", "").strip()
    own_schedule = p.get("Hires schedule type", "").strip()
    own_sampler = "" if own_sampler.lower().startswith("use same") else own_sampler
    own_schedule = "" if own_schedule.lower().startswith("use same") else own_schedule
    if own_sampler or own_schedule:
        sampler, scheduler = sampler_and_scheduler(own_sampler or p.get("Sampler", "Euler"),
                                                   own_schedule or p.get("Schedule type"), version, notes)
    cfg = _number(p, "Hires CFG Scale", float, None, notes)
    params["hires_steps"], params["denoise"] = steps, strength
    for key, node_id in (("Hires prompt", "hires_positive"), ("Hires negative prompt", "hires_negative")):
        if p.get(key, "").strip():  # written only when it differs from the first pass's prompt
            clip = dict(nodes["positive"]["clip"])
            nodes[node_id] = {"type": "CLIPTextEncode", "clip": clip, "text": p[key], "weighting": "a1111"}
            sampling = sampling | {node_id.split("_")[1]: {"from": f"{node_id}.CONDITIONING"}}
    nodes["hires_sampler"] = {"type": "KSampler", **sampling, "latent_image": {"from": latent},
                              "steps": "$hires_steps", "cfg": "$cfg" if cfg is None else cfg,
                              "sampler_name": sampler, "scheduler": scheduler, "denoise": "$denoise"}
    return "hires_sampler.LATENT"


def _pixel_upscale(nodes: dict, upscaler: str, size_inputs: dict, vae: str, notes: list[str]) -> str | None:
    """Decode, upscale the image (a model, or Lanczos/Nearest), resize to the target; None when the node
    types for it do not exist (the caller then upscales the latent)."""
    have = {t: get_spec(t) is not None for t in ("UpscaleModelLoader", "ImageUpscaleWithModel", "ImageScale")}
    pixel = PIXEL_UPSCALERS.get(upscaler.lower())
    if upscaler.lower() == "none":  # A1111 then resizes the image with Lanczos (images.resize_image)
        pixel = "lanczos"
    if not have["ImageScale"] or (pixel is None and not (have["UpscaleModelLoader"]
                                                         and have["ImageUpscaleWithModel"])):
        missing = ", ".join(t for t, ok in have.items() if not ok)
        notes.append(f"not mapped: Hires upscaler '{upscaler}' (sdgraph lacks {missing}); the latent is "
                     "upscaled (bilinear) instead")
        return None
    nodes["first_decode"] = {"type": "VAEDecode", "samples": {"from": "sampler.LATENT"}, "vae": {"from": vae}}
    image = "first_decode.IMAGE"
    if pixel is None:
        nodes["upscale_model"] = {"type": "UpscaleModelLoader", "model_name": _file(upscaler, ".pth")}
        nodes["model_upscale"] = {"type": "ImageUpscaleWithModel", "image": {"from": image},
                                  "upscale_model": {"from": "upscale_model.0"}}
        notes.append(f"upscale model file taken as '{_file(upscaler, '.pth')}' from Hires upscaler: "
                     f"{upscaler}")
        image = "model_upscale.IMAGE"
    nodes["resize"] = {"type": "ImageScale", "image": {"from": image}, "upscale_method": pixel or "bicubic",
                       **size_inputs}
    return "resize.IMAGE"


def load_infotext_file(path: Path, text: str) -> Workflow:
    return workflow_from_infotext(text, f"{path} [A1111 parameters]")
