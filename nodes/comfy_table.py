"""How ComfyUI's built-in node classes map onto sdgraph's nodes (used both ways: import and export).

sdgraph's nodes keep ComfyUI's input names and output order, so most rows need no renames; the table
still spells them out so a future difference is one line here. Links use output indices in ComfyUI
and output names in sdgraph; the node's declared outputs translate one into the other.
"""

from __future__ import annotations

import re
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
    "CLIPTextEncode": Mapping("CLIPEncode", "encode", ours_only=frozenset({"weighting"})),
    "CLIPSetLastLayer": Mapping("CLIPSetLastLayer", "clip_skip"),
    "EmptyLatentImage": Mapping("EmptyLatent", "latent"),
    # `upload` (the upload button) and `choose file to upload` (its older name, in most ComfyUI PNGs)
    "LoadImage": Mapping("LoadImage", "image", ignored=frozenset({"upload", "choose file to upload"})),
    "VAEEncode": Mapping("VAEEncode", "vae_encode"),
    "VAEDecode": Mapping("VAEDecode", "vae_decode"),
    "KSampler": Mapping("KSampler", "sampler", ours_only=frozenset({"noise_device", "eta_noise_seed_delta"})),
    "KSamplerAdvanced": Mapping("KSamplerAdvanced", "sampler",
                                ours_only=frozenset({"noise_device", "eta_noise_seed_delta"})),
    "LatentUpscale": Mapping("LatentUpscale", "upscale"),
    "SaveImage": Mapping("SaveImage", "save"),
    # image, latent and mask operations (same names and inputs)
    "ImageScale": Mapping("ImageScale", "scale"),
    "ImageScaleBy": Mapping("ImageScaleBy", "scale"),
    "ImageScaleToTotalPixels": Mapping("ImageScaleToTotalPixels", "scale"),
    "EmptyImage": Mapping("EmptyImage", "empty_image"),
    "ImageInvert": Mapping("ImageInvert", "invert"),
    "ImageBatch": Mapping("ImageBatch", "batch"),
    "ImageCrop": Mapping("ImageCrop", "crop"),
    "ImagePadForOutpaint": Mapping("ImagePadForOutpaint", "pad"),
    "ImageCompositeMasked": Mapping("ImageCompositeMasked", "composite"),
    "LatentUpscaleBy": Mapping("LatentUpscaleBy", "upscale"),
    "RepeatLatentBatch": Mapping("RepeatLatentBatch", "repeat"),
    "LatentFromBatch": Mapping("LatentFromBatch", "from_batch"),
    "LatentComposite": Mapping("LatentComposite", "composite"),
    "LatentCompositeMasked": Mapping("LatentCompositeMasked", "composite"),
    "LatentBlend": Mapping("LatentBlend", "blend"),
    "LatentCrop": Mapping("LatentCrop", "crop"),
    "LatentFlip": Mapping("LatentFlip", "flip"),
    "LatentRotate": Mapping("LatentRotate", "rotate"),
    "LatentBatch": Mapping("LatentBatch", "batch"),
    "LatentBatchSeedBehavior": Mapping("LatentBatchSeedBehavior", "seed_behavior"),
    "LatentAdd": Mapping("LatentAdd", "add"),
    "LatentSubtract": Mapping("LatentSubtract", "subtract"),
    "LatentMultiply": Mapping("LatentMultiply", "multiply"),
    "RepeatImageBatch": Mapping("RepeatImageBatch", "repeat"),
    "ImageFromBatch": Mapping("ImageFromBatch", "from_batch"),
    "CropMask": Mapping("CropMask", "mask"),
    "ImageColorToMask": Mapping("ImageColorToMask", "mask"),
    "ImageFlip": Mapping("ImageFlip", "flip"),
    "ImageRotate": Mapping("ImageRotate", "rotate"),
    "LoadImageMask": Mapping("LoadImageMask", "mask", ignored=frozenset({"upload"})),
    "ImageToMask": Mapping("ImageToMask", "mask"),
    "MaskToImage": Mapping("MaskToImage", "mask_image"),
    "InvertMask": Mapping("InvertMask", "mask"),
    "SolidMask": Mapping("SolidMask", "mask"),
    "GrowMask": Mapping("GrowMask", "mask"),
    "FeatherMask": Mapping("FeatherMask", "mask"),
    "MaskComposite": Mapping("MaskComposite", "mask"),
    "ThresholdMask": Mapping("ThresholdMask", "mask"),
    "SetLatentNoiseMask": Mapping("SetLatentNoiseMask", "noise_mask"),
    "VAEEncodeForInpaint": Mapping("VAEEncodeForInpaint", "inpaint_encode"),
    "InpaintModelConditioning": Mapping("InpaintModelConditioning", "inpaint"),
    # `strength` is optional in current ComfyUI (older versions have no input at all)
    "DifferentialDiffusion": Mapping("DifferentialDiffusion", "differential_diffusion",
                                     ours_only=frozenset({"strength"})),
    "PreviewImage": Mapping("PreviewImage", "preview"),
    "CheckpointLoader": Mapping("CheckpointLoader", "ckpt"),
    "VAELoader": Mapping("VAELoader", "vae"),
    "LoraLoaderModelOnly": Mapping("LoraLoaderModelOnly", "lora", ours_only=frozenset({"allow_partial"})),
    "SaveLatent": Mapping("SaveLatent", "save_latent"),
    "LoadLatent": Mapping("LoadLatent", "load_latent"),
    "VAEDecodeTiled": Mapping("VAEDecodeTiled", "vae_decode"),
    "VAEEncodeTiled": Mapping("VAEEncodeTiled", "vae_encode"),
    "ModelSamplingDiscrete": Mapping("ModelSamplingDiscrete", "model_sampling"),
    "UpscaleModelLoader": Mapping("UpscaleModelLoader", "upscale_model"),
    "ImageUpscaleWithModel": Mapping("ImageUpscaleWithModel", "upscale_image"),
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
    "GLIGENLoader": Mapping("GLIGENLoader", "gligen"),
    "GLIGENTextBoxApply": Mapping("GLIGENTextBoxApply", "gligen_box"),
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


# Nodes a ComfyUI workflow may hold that sdgraph can leave out without changing any result: an API file's
# PreviewImage (a sink that shows an image in ComfyUI's UI) is dropped, with a note, until such a node exists.
SKIPPABLE: frozenset[str] = frozenset({"PreviewImage"})


def mapping_for(comfy_class: str) -> Mapping | None:
    """The table's row, else a registered node of that name (new nodes carry ComfyUI's class names and
    inputs, so they import without a row here); None when sdgraph has no such node."""
    if comfy_class in COMFY_TO_OURS:
        return COMFY_TO_OURS[comfy_class]
    from graph.declare import canonical_type, get_spec

    if get_spec(comfy_class) is None:
        return None
    slug = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", comfy_class).lower()
    return Mapping(canonical_type(comfy_class), re.sub(r"[^a-z0-9_]", "_", slug))
