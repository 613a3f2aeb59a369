"""The values of ComfyUI's custom-sampling sockets: SIGMAS, SAMPLER, NOISE and GUIDER.

SIGMAS is a float32 1-D `mx.array` (a schedule, ending in 0 when it runs to the end), stored as npz.
SAMPLER and NOISE are small recipes stored as JSON. GUIDER holds a MODEL recipe and conditionings, like
a MODEL it stays in memory (building it costs nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import mlx.core as mx

from graph import socket_type
from nodes.values import Conditioning, ModelRecipe, array_from_bytes, array_to_bytes


@dataclass(frozen=True)
class SamplerRecipe:
    """SAMPLER: a sampler by ComfyUI's name (sd/sampling/samplers.py)."""

    name: str


@dataclass(frozen=True)
class NoiseRecipe:
    """NOISE: ComfyUI's RandomNoise(seed) or, with `random` false, DisableNoise (zeros; seed 0)."""

    seed: int = 0
    random: bool = True

    def generate(self, shape) -> mx.array:
        from sd.sampling.ksampler import prepare_noise

        return prepare_noise(self.seed, shape) if self.random else mx.zeros(tuple(shape), dtype=mx.float32)


GUIDER_KINDS = {"cfg": ("positive", "negative"), "basic": ("conditioning",),
                "dual_cfg": ("cond1", "cond2", "negative"), "perp_neg": ("positive", "negative", "empty")}


@dataclass(frozen=True, eq=False)
class GuiderRecipe:
    """GUIDER: how the denoiser combines predictions (`kind`), over which model and conditionings (named
    by GUIDER_KINDS[kind]) with which scales (cfg; DualCFG: cfg_conds, cfg_cond2_negative; PerpNeg: cfg,
    neg_scale)."""

    kind: str
    model: ModelRecipe
    conds: tuple[Conditioning, ...]
    scales: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.conds)


def _sigmas_from_bytes(blob: bytes) -> mx.array:
    return array_from_bytes(blob)


def register_socket_types() -> None:
    socket_type("SIGMAS", to_bytes=array_to_bytes, from_bytes=_sigmas_from_bytes)
    socket_type("SAMPLER", to_bytes=lambda s: json.dumps({"name": s.name}).encode(),
                from_bytes=lambda b: SamplerRecipe(json.loads(b)["name"]))
    socket_type("NOISE", to_bytes=lambda n: json.dumps({"seed": n.seed, "random": n.random}).encode(),
                from_bytes=lambda b: NoiseRecipe(**json.loads(b)))
    socket_type("GUIDER")


register_socket_types()
SIGMAS, SAMPLER, NOISE, GUIDER = (socket_type(n) for n in ("SIGMAS", "SAMPLER", "NOISE", "GUIDER"))
