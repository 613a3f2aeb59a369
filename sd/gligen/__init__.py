"""GLIGEN: boxes that place objects, as gated self-attention over the UNet's image tokens and box tokens.

    gligen = load_gligen("models/gligen/gligen_sd14_textbox_pruned.safetensors")     # shapes -> sizes
    source = GligenSource(gligen, [(pooled [1, 768], h, w, y, x), ...])              # latent pixels
    extras = source.unet_extras(x, t, context, areas)        # a `middle_patch` (sd/models/unet_extras.py)

Behaviour follows ComfyUI (comfy/gligen.py, the "position" case of comfy/samplers.py): a position net turns
each box (its corners as fractions of the evaluated latent, Fourier-embedded) and the pooled CLIP output
of its text into one token; up to 30 tokens, absent ones replaced by learnt null features. After the
self-attention of transformer block k (counted over the UNet), fuser k adds
tanh(alpha_attn) * attn(norm1([x, linear(objs)]))[:, :n_visual] and tanh(alpha_dense) * ff(norm2(x)).
"""

from sd.gligen.model import MAX_OBJECTS, GatedSelfAttentionDense, Gligen, GligenSource, PositionNet
from sd.gligen.reader import gligen_key_dim, load_gligen

__all__ = ["MAX_OBJECTS", "GatedSelfAttentionDense", "Gligen", "GligenSource", "PositionNet",
           "gligen_key_dim", "load_gligen"]
