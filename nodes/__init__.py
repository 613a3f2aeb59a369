"""sdgraph's Stable Diffusion nodes. Importing this package registers them, the disk serializers of
their socket types, and the ComfyUI / PNG workflow importers. It sets up nothing else: a program calls
`sd.runtime.setup()` before importing it (the CLI does), or MLX keeps its slow reference BLAS on Linux.

    values.py        socket values (recipes for MODEL/CLIP/VAE; arrays) and their serializers
    models.py        weights built from recipes on first use, kept for reuse
    paths.py         ComfyUI-style file resolution (models/checkpoints, models/loras, input/)
    loaders.py       LoadCheckpoint, LoadLoRA
    conditioning.py  CLIPEncode, CLIPSetLastLayer
    conditioning_ops.py  ConditioningCombine/Concat/Average/ZeroOut/SetArea*/SetMask/SetTimestepRange
    latents.py       EmptyLatent, LatentUpscale, VAEEncode, VAEDecode
    sampling.py      KSampler, KSamplerAdvanced
    sampling_values.py, custom_sampling.py   SIGMAS/SAMPLER/NOISE/GUIDER and ComfyUI's custom sampling nodes
    model_patches.py RescaleCFG, FreeU_V2, SelfAttentionGuidance, PerturbedAttentionGuidance
    images.py        LoadImage, SaveImage
    estimates.py     memory estimates of a plan, checked before it runs
    comfy_*.py       ComfyUI API-format import/export; png_workflow.py: workflows inside PNGs
    doctor.py, demo.py   `sdgraph doctor` and `sdgraph demo`
"""

from nodes import values  # noqa: F401, I001  (registers the serializers before the nodes are declared)
from nodes import conditioning, images, latents, loaders, sampling  # noqa: F401
from nodes import sampling_values  # noqa: F401, I001  (the custom-sampling socket types)
from nodes import conditioning_ops, custom_sampling, model_patches  # noqa: F401
from nodes import comfy_import, estimates, png_workflow

comfy_import.register()
png_workflow.register()
estimates.register()
