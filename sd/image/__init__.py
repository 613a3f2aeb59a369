"""Pixels and latents: resizing (ComfyUI's upscale methods, resize.py), VAE encode/decode of images
(codec.py), tiled decode (tiling.py), and ComfyUI's image/latent operations (ops.py) and mask operations
(masks.py)."""
