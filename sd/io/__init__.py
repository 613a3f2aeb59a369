"""Tensor file formats: safetensors, PyTorch zip and legacy pickles (read by a restricted unpickler)."""
