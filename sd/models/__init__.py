"""The readable SD1.x models (CLIP text encoder, UNet, VAE): one forward each, plain MLX."""
