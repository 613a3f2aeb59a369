"""Model merging as weight patches: which strengths ComfyUI's merge nodes give each weight (rules.py); the
arithmetic runs in sd/lora/patching.py's `apply_patches`, the one patching path LoRAs take too."""
