"""How ComfyUI's built-in node classes map onto sdgraph's nodes (used both ways: import and export).

sdgraph's nodes keep ComfyUI's input names and output order, so most rows need no renames; the table
still spells them out so a future difference is one line here. Links use output indices in ComfyUI
and output names in sdgraph; the node's declared outputs translate one into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mapping:
    ours: str                                             # sdgraph node type
    slug: str                                             # readable prefix for converted node ids
    renames: dict[str, str] = field(default_factory=dict)  # ComfyUI input name -> ours
    ignored: frozenset[str] = frozenset()                 # UI-only inputs that carry no meaning here
    ours_only: frozenset[str] = frozenset()               # our extra inputs, left out of exports at default

    def rename(self, comfy_input: str) -> str:
        return self.renames.get(comfy_input, comfy_input)

    def comfy_name(self, our_input: str) -> str:
        return next((c for c, o in self.renames.items() if o == our_input), our_input)


COMFY_TO_OURS: dict[str, Mapping] = {
    "CheckpointLoaderSimple": Mapping("LoadCheckpoint", "ckpt"),
    "LoraLoader": Mapping("LoadLoRA", "lora", ours_only=frozenset({"allow_partial"})),
    "CLIPTextEncode": Mapping("CLIPEncode", "encode", ours_only=frozenset({"weighting"})),
    "CLIPSetLastLayer": Mapping("CLIPSetLastLayer", "clip_skip"),
    "EmptyLatentImage": Mapping("EmptyLatent", "latent"),
    "LoadImage": Mapping("LoadImage", "image", ignored=frozenset({"upload"})),
    "VAEEncode": Mapping("VAEEncode", "vae_encode"),
    "VAEDecode": Mapping("VAEDecode", "vae_decode"),
    "KSampler": Mapping("KSampler", "sampler", ours_only=frozenset({"noise_device", "eta_noise_seed_delta"})),
    "KSamplerAdvanced": Mapping("KSamplerAdvanced", "sampler",
                                ours_only=frozenset({"noise_device", "eta_noise_seed_delta"})),
    "LatentUpscale": Mapping("LatentUpscale", "upscale"),
    "SaveImage": Mapping("SaveImage", "save"),
}

OURS_TO_COMFY: dict[str, str] = {m.ours: comfy for comfy, m in COMFY_TO_OURS.items()}
