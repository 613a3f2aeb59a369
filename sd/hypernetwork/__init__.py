"""A1111 hypernetworks: small residual MLPs on the inputs of the UNet attentions' k and v projections.

    hn = load_hypernetwork("models/hypernetworks/style.pt")        # through the safe unpickler
    unet2 = attach_hypernetworks(unet, [(hn, 0.8)])                # unet itself is untouched

Behaviour follows ComfyUI's HypernetworkLoader (comfy_extras/nodes_hypernetwork.py): the file's modules for
a width act on every attention whose k/v input has that width — the cross-attentions' text context (768)
and the self-attentions' own tokens (320/640/1280 in SD1.5) — as k_in + module_k(k_in) * strength and
v_in + module_v(v_in) * strength, inference mode (dropout off); several hypernetworks chain in order.
"""

from sd.hypernetwork.module import Hypernetwork, attach_hypernetworks
from sd.hypernetwork.reader import load_hypernetwork

__all__ = ["Hypernetwork", "attach_hypernetworks", "load_hypernetwork"]
