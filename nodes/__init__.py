"""sdgraph's Stable Diffusion nodes. Importing this package registers them, the disk serializers of
their socket types, and the ComfyUI / PNG workflow importers. It sets up nothing else: a program calls
`sd.runtime.setup()` before importing it (the CLI does), or MLX keeps its slow reference BLAS on Linux.

    values.py        socket values (recipes for MODEL/CLIP/VAE; arrays) and their serializers
    models.py        weights built from recipes on first use, kept for reuse
    paths.py         ComfyUI-style file resolution (models/checkpoints, models/loras, input/)
    loaders.py       LoadCheckpoint, CheckpointLoader, VAELoader, LoadLoRA, LoraLoaderModelOnly,
                     HypernetworkLoader
    checkpoint_configs.py  what CheckpointLoader's config_name may say
    merging.py       ModelMerge*, CLIPMerge* (merges as recipe patches), CheckpointSave
    conditioning.py  CLIPEncode, CLIPSetLastLayer
    conditioning_ops.py  ConditioningCombine/Concat/Average/ZeroOut/SetArea*/SetMask/SetTimestepRange
    latents.py       EmptyLatent, LatentUpscale, VAEEncode, VAEDecode
    sampling.py      KSampler, KSamplerAdvanced
    sampling_values.py, custom_sampling.py   SIGMAS/SAMPLER/NOISE/GUIDER and ComfyUI's custom sampling nodes
    conditioning_ops.py  ConditioningCombine/Concat/Average/ZeroOut/SetArea*/SetMask/SetTimestepRange
    model_patches.py ModelSamplingDiscrete (how a model is sampled), RescaleCFG, FreeU_V2,
                     SelfAttentionGuidance, PerturbedAttentionGuidance (guidance maths, not weights)
    images.py        LoadImage, SaveImage, PreviewImage (prefix_tokens.py: ComfyUI's %date%/%Node.input%)
    latent_files.py  SaveLatent, LoadLatent (ComfyUI's .latent files)
    vae_tiled.py     VAEDecodeTiled, VAEEncodeTiled
    image_ops.py     ImageScale(By/ToTotalPixels), EmptyImage, ImageInvert/Batch/Crop, ImagePadForOutpaint,
                     ImageCompositeMasked
    latent_ops.py    LatentUpscaleBy, Repeat/FromBatch, LatentComposite(Masked), Blend, Crop, Flip, Rotate
    masks.py         LoadImageMask, ImageToMask, MaskToImage, Invert/Solid/Grow/Feather/ThresholdMask,
                     MaskComposite
    inpaint.py       SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning, DifferentialDiffusion,
                     and the 9-channel UNet's concat input added to the samplers' entries
    gligen.py        GLIGENLoader, GLIGENTextBoxApply (GLIGEN boxes as a conditioning option)
    upscale.py       UpscaleModelLoader, ImageUpscaleWithModel (ESRGAN-family upscale models)
    controlnet.py    ControlNetLoader, DiffControlNetLoader, ControlNetApply(Advanced), Canny
    estimates.py     memory estimates of a plan, checked before it runs (image_estimates.py: the ops above)
    comfy_*.py       ComfyUI API-format import/export; png_workflow.py: workflows inside PNGs
    doctor.py, demo.py   `sdgraph doctor` and `sdgraph demo`
"""

from nodes import values  # noqa: F401, I001  (registers the serializers before the nodes are declared)
from nodes import sampling_values  # noqa: F401, I001  (the custom-sampling socket types)
from nodes import conditioning, images, latent_files, latents, loaders, merging, model_patches  # noqa: F401
from nodes import image_ops, latent_ops, masks, sampling, upscale, vae_tiled  # noqa: F401
from nodes import conditioning_ops, controlnet, custom_sampling, gligen, inpaint  # noqa: F401
from nodes import comfy_import, estimates, image_estimates, png_workflow

comfy_import.register()
png_workflow.register()
estimates.register()
image_estimates.register()
