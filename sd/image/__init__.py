"""Pixels and latents: resizing (ComfyUI's upscale methods), VAE encode/decode of images, tiled decode."""
