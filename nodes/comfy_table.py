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
    "ConditioningCombine": Mapping("ConditioningCombine", "combine"),
    "ConditioningConcat": Mapping("ConditioningConcat", "concat"),
    "ConditioningAverage": Mapping("ConditioningAverage", "average"),
    "ConditioningZeroOut": Mapping("ConditioningZeroOut", "zero_out"),
    "ConditioningSetArea": Mapping("ConditioningSetArea", "area"),
    "ConditioningSetAreaPercentage": Mapping("ConditioningSetAreaPercentage", "area"),
    "ConditioningSetAreaStrength": Mapping("ConditioningSetAreaStrength", "area_strength"),
    "ConditioningSetMask": Mapping("ConditioningSetMask", "cond_mask"),
    "ConditioningSetTimestepRange": Mapping("ConditioningSetTimestepRange", "timestep_range"),
    "SamplerCustom": Mapping("SamplerCustom", "sampler"),
    "SamplerCustomAdvanced": Mapping("SamplerCustomAdvanced", "sampler"),
    "KSamplerSelect": Mapping("KSamplerSelect", "sampler_select"),
    "BasicScheduler": Mapping("BasicScheduler", "sigmas"),
    "KarrasScheduler": Mapping("KarrasScheduler", "sigmas"),
    "ExponentialScheduler": Mapping("ExponentialScheduler", "sigmas"),
    "PolyexponentialScheduler": Mapping("PolyexponentialScheduler", "sigmas"),
    "SDTurboScheduler": Mapping("SDTurboScheduler", "sigmas"),
    "AlignYourStepsScheduler": Mapping("AlignYourStepsScheduler", "sigmas"),
    "SplitSigmas": Mapping("SplitSigmas", "split"),
    "SplitSigmasDenoise": Mapping("SplitSigmasDenoise", "split"),
    "FlipSigmas": Mapping("FlipSigmas", "flip"),
    "CFGGuider": Mapping("CFGGuider", "guider"),
    "BasicGuider": Mapping("BasicGuider", "guider"),
    "DualCFGGuider": Mapping("DualCFGGuider", "guider"),
    "PerpNegGuider": Mapping("PerpNegGuider", "guider"),
    "RandomNoise": Mapping("RandomNoise", "noise"),
    "DisableNoise": Mapping("DisableNoise", "noise"),
    "RescaleCFG": Mapping("RescaleCFG", "rescale_cfg"),
    "FreeU_V2": Mapping("FreeU_V2", "freeu"),
    "SelfAttentionGuidance": Mapping("SelfAttentionGuidance", "sag"),
    "PerturbedAttentionGuidance": Mapping("PerturbedAttentionGuidance", "pag"),
}

OURS_TO_COMFY: dict[str, str] = {m.ours: comfy for comfy, m in COMFY_TO_OURS.items()}
