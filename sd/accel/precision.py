"""Default compute dtypes per model component, and parsing of user-given dtype names.

MLX's CPU backend has no fp16 BLAS, so fp16 there is both slower and less precise: CPU runs fp32.
On a GPU the UNet and the text encoder run fp16. The VAE runs bf16: SD1.x's VAE decoder is known to
overflow fp16 on some latents, and bf16 keeps fp32's exponent range at fp16's speed (docs/performance.md,
"bf16 VAE on GPU").
"""

from __future__ import annotations

import mlx.core as mx

COMPONENTS = ("unet", "vae", "clip")

_GPU_DEFAULTS = {"unet": mx.float16, "clip": mx.float16, "vae": mx.bfloat16}

_NAMES = {
    "float32": mx.float32, "fp32": mx.float32, "f32": mx.float32,
    "float16": mx.float16, "fp16": mx.float16, "f16": mx.float16, "half": mx.float16,
    "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
}


def on_gpu() -> bool:
    """True when MLX computes on a GPU (Metal or CUDA) by default."""
    return mx.default_device().type == mx.DeviceType.gpu


def default_dtype(component: str) -> mx.Dtype:
    """The dtype a component's weights are loaded in when the caller does not choose one."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    return _GPU_DEFAULTS[component] if on_gpu() else mx.float32


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """Accept an `mx.Dtype`, a name such as "fp16"/"bfloat16", or None (meaning: use the default)."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return _NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_NAMES)}") from None
