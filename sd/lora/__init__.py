"""LoRA in the common formats (kohya, LoCon, LyCORIS LoHa/LoKr, diffusers/PEFT, DoRA) as non-destructive
patches.

    lora = load_lora("loras/style.safetensors")
    print(lora.coverage(unet=ckpt.unet, text_encoder=ckpt.clip))   # unet 192/192, text encoder 72/72
    unet = apply_loras(ckpt.unet, [(lora, 0.8)], "unet")            # ckpt.unet itself is untouched
    clip = apply_loras(ckpt.clip, [(lora, 1.0)], "text_encoder")
"""

from sd.lora.lora_file import LoRA, load_lora, lora_from_tensors
from sd.lora.patching import apply_lora_stack, apply_loras, patch_set_key
from sd.lora.report import ComponentCoverage, CoverageReport

__all__ = ["LoRA", "load_lora", "lora_from_tensors", "apply_loras", "apply_lora_stack", "patch_set_key",
           "ComponentCoverage", "CoverageReport"]
