"""spandrel (the library ComfyUI loads upscale models with): the reference for sd/models/esrgan.py, srvgg.py.

spandrel imports every architecture it knows when imported, and two of them (LaMa, RestoreFormer) import
torchvision, which is not a test dependency: PyPI's torchvision wheels pin their own torch and do not load
beside our torch==2.13.0. Those two architectures are never used here, so when torchvision is missing a
stand-in module with the two names they import is put in its place; calling either raises. ESRGAN and Compact,
the architectures compared against, use torch only.
"""

from __future__ import annotations

import importlib
import sys
import types


def _torchvision_stand_in() -> None:
    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed; this spandrel architecture is not usable here")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {"BILINEAR": "bilinear"})
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    package.__path__ = []  # a package, so "from torchvision.transforms.functional import ..." resolves
    sys.modules.update({"torchvision": package, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


def spandrel():
    """The spandrel package (pytest.importorskip'd by the caller)."""
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception:  # noqa: BLE001 - missing, or a wheel built for another torch
        _drop_torchvision()
        _torchvision_stand_in()
        try:
            return importlib.import_module("spandrel")
        finally:
            # spandrel has taken the names it imports; later importers (diffusers, transformers probe
            # `importlib.util.find_spec("torchvision")`) must see no torchvision, not the stand-in
            _drop_torchvision()
    return importlib.import_module("spandrel")


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def load(state: dict):
    """spandrel's ImageModelDescriptor for a state dict of numpy arrays (float32, eval mode)."""
    import torch

    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    return spandrel().ModelLoader().load_from_state_dict(tensors).eval()
