"""How ComfyUI's built-in node classes map onto sdgraph's nodes (used both ways: import and export).

sdgraph's nodes keep ComfyUI's input names and output order, so most rows need no renames; the table
still spells them out so a future difference is one line here. Links use output indices in ComfyUI
and output names in sdgraph; the node's declared outputs translate one into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd.merge.rules import SD1_BLOCKS


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
    "CLIPTextEncode": Mapping("CLIPEncode", "encode"),
    "CLIPSetLastLayer": Mapping("CLIPSetLastLayer", "clip_skip"),
    "EmptyLatentImage": Mapping("EmptyLatent", "latent"),
    "LoadImage": Mapping("LoadImage", "image", ignored=frozenset({"upload"})),
    "VAEEncode": Mapping("VAEEncode", "vae_encode"),
    "VAEDecode": Mapping("VAEDecode", "vae_decode"),
    "KSampler": Mapping("KSampler", "sampler"),
    "KSamplerAdvanced": Mapping("KSamplerAdvanced", "sampler"),
    "LatentUpscale": Mapping("LatentUpscale", "upscale"),
    "SaveImage": Mapping("SaveImage", "save"),
    "HypernetworkLoader": Mapping("HypernetworkLoader", "hypernetwork"),
    "ModelMergeSimple": Mapping("ModelMergeSimple", "merge"),
    "ModelMergeBlocks": Mapping("ModelMergeBlocks", "merge"),
    "ModelMergeSubtract": Mapping("ModelMergeSubtract", "merge"),
    "ModelMergeAdd": Mapping("ModelMergeAdd", "merge"),
    "ModelMergeSD1": Mapping("ModelMergeSD1", "merge", renames={
        prefix: prefix.rstrip(".").replace(".", "_") for prefix in SD1_BLOCKS}),
    "CLIPMergeSimple": Mapping("CLIPMergeSimple", "clip_merge"),
    "CLIPMergeSubtract": Mapping("CLIPMergeSubtract", "clip_merge"),
    "CLIPMergeAdd": Mapping("CLIPMergeAdd", "clip_merge"),
    "CheckpointSave": Mapping("CheckpointSave", "save_checkpoint"),
}

OURS_TO_COMFY: dict[str, str] = {m.ours: comfy for comfy, m in COMFY_TO_OURS.items()}
