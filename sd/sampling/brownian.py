"""torchsde's ``BrownianTree`` as ComfyUI builds it, value for value, without torch.

ComfyUI's SDE samplers (``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde`` and their ``_gpu`` twins) draw
their noise from ``BrownianTreeNoiseSampler``: ``torchsde.BrownianTree(t0=sigma_min, w0=zeros_like(x),
t1=sigma_max, entropy=seed)`` (torchsde 0.2.6, ``tol=1e-6``, ``pool_size=24``, a "halfway" tree) and
``noise(s, s_next) = W(s, s_next) / sqrt(|s_next - s|)``. How torchsde builds W (read in
``torchsde/_brownian/brownian_interval.py``):

* Times are rounded to 6 decimals (``round(t, 6)``; tol 1e-6); queries are clamped to [t0, t1].
* The root interval [t0, t1] holds ``W = randn(seed_W) * sqrt(t1 - t0)``, where
  ``seed_W = SeedSequence(entropy, pool_size=24).generate_state(3)[0]`` and ``randn(s)`` is
  ``torch.randn(shape, generator=torch.Generator(device).manual_seed(s))`` (float32).
* Every interval splits at its rounded midpoint. A node of depth d and key k (root: 0, 0; children
  2k and 2k + 1 at depth d + 1) takes ``seed = SeedSequence(entropy, spawn_key=(k, d),
  pool_size=24).generate_state(4)[0]``; its children's increments are the Brownian bridge
  ``left = (l / h) * W + sqrt(l * r / h) * randn(seed)``, ``right = W - left`` (l, r: the halves' lengths,
  h: the node's; float32 arithmetic with the coefficients rounded to float32, as torch multiplies a
  float32 tensor by a Python float).
* A query [a, b] is cut at the midpoints it straddles into whole tree intervals, whose increments are
  summed left to right.

``randn`` is torch's CPU generator (sd/sampling/noise.py) for ComfyUI's default ``cpu=True`` trees, or
the CUDA generator (sd/sampling/philox.py) for the ``_gpu`` samplers, whose trees live on the GPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from sd.sampling.noise import TorchCPUGenerator

_TOL_DIGITS = 6  # torchsde BrownianTree's tol=1e-6
_POOL_SIZE = 24
_CACHE_NODES = 64  # increments kept; values never depend on it (every node is recomputable)

SeededRandn = Callable[[int, tuple[int, ...]], np.ndarray]


_CPU_GENERATOR = TorchCPUGenerator(0)  # re-seeded for every draw, as torchsde makes a generator per draw


def cpu_randn(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``."""
    return _CPU_GENERATOR.manual_seed(seed).randn(shape)


def _round(t: float) -> float:
    return round(t, _TOL_DIGITS)


class _Node:
    __slots__ = ("start", "end", "key", "depth", "parent", "is_left", "midway", "left", "right", "_seed")

    def __init__(self, start: float, end: float, key: int, depth: int, parent: _Node | None, is_left: bool):
        self.start, self.end = _round(start), _round(end)
        self.key, self.depth, self.parent, self.is_left = key, depth, parent, is_left
        self.midway: float | None = None
        self.left: _Node | None = None
        self.right: _Node | None = None
        self._seed: int | None = None

    def split(self) -> None:
        if self.midway is None:
            middle = 0.5 * (self.end + self.start)
            self.midway = _round(middle)
            self.left = _Node(self.start, middle, 2 * self.key, self.depth + 1, self, True)
            self.right = _Node(middle, self.end, 2 * self.key + 1, self.depth + 1, self, False)

    def bridge_seed(self, entropy: int) -> int:
        if self._seed is None:
            sequence = np.random.SeedSequence(
                entropy=entropy, spawn_key=(self.key, self.depth), pool_size=_POOL_SIZE
            )
            self._seed = int(sequence.generate_state(4)[0])
        return self._seed


class BrownianTree:
    """``torchsde.BrownianTree(t0, zeros(shape), t1, entropy=entropy)``: ``tree(a, b)`` is W(b) - W(a)."""

    def __init__(
        self, shape: Sequence[int], t0: float, t1: float, entropy: int, randn: SeededRandn = cpu_randn
    ):
        t0, t1 = float(t0), float(t1)
        if t0 > t1:
            raise ValueError(f"Brownian tree needs t0 <= t1, got {t0} > {t1}")
        self.shape = tuple(int(s) for s in shape)
        self.entropy = int(entropy)
        self._randn = randn
        self._root = _Node(t0, t1, 0, 0, None, False)
        root_seed = int(
            np.random.SeedSequence(entropy=self.entropy, pool_size=_POOL_SIZE).generate_state(3)[0]
        )
        self._root_w = self._draw(root_seed) * np.float32(math.sqrt(t1 - t0))
        self._cache: OrderedDict[_Node, np.ndarray] = OrderedDict()

    def _draw(self, seed: int) -> np.ndarray:
        return np.asarray(self._randn(seed, self.shape), dtype=np.float32)

    def _increment(self, node: _Node) -> np.ndarray:
        if node.parent is None:
            return self._root_w
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        parent = node.parent
        parent_w = self._increment(parent)
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
        noise = self._draw(parent.bridge_seed(self.entropy))
        mean = np.float32(left_diff) * parent_w * np.float32(h_reciprocal)
        left_w = mean + np.float32(math.sqrt(left_diff * right_diff * h_reciprocal)) * noise
        right_w = parent_w - left_w
        for child, value in ((parent.left, left_w), (parent.right, right_w)):  # one draw serves both halves
            self._cache[child] = value
            self._cache.move_to_end(child)
        while len(self._cache) > _CACHE_NODES:
            self._cache.popitem(last=False)
        return left_w if node.is_left else right_w

    def _pieces(self, node: _Node, a: float, b: float, out: list[_Node]) -> None:
        while True:
            if a == node.start and b == node.end:
                out.append(node)
                return
            node.split()
            if b <= node.midway:
                node = node.left
            elif a >= node.midway:
                node = node.right
            else:
                self._pieces(node.left, a, node.midway, out)
                node, a = node.right, node.midway

    def __call__(self, a: float, b: float) -> np.ndarray:
        a = min(max(float(a), self._root.start), self._root.end)
        b = min(max(float(b), self._root.start), self._root.end)
        if a > b:
            raise ValueError(f"Brownian tree query needs a <= b, got {a} > {b}")
        if a == b:
            return np.zeros(self.shape, dtype=np.float32)
        pieces: list[_Node] = []
        self._pieces(self._root, _round(a), _round(b), pieces)
        total = self._increment(pieces[0])
        for piece in pieces[1:]:
            total = total + self._increment(piece)
        return total


def _nhwc_to_nchw(shape: Sequence[int]) -> tuple[int, int, int, int]:
    b, h, w, c = shape
    return (b, c, h, w)


class BrownianTreeNoiseSampler:
    """ComfyUI's ``BrownianTreeNoiseSampler`` (identity transform): NHWC in and out, drawn NCHW as ComfyUI.

    ``seed`` is one int (one tree over the whole batch, as KSampler passes it) or one int per batch item
    (a tree per item, as ``BatchedBrownianTree`` does for a list of seeds). ``randn`` picks the device
    whose generator the tree uses (torch's CPU one by default, i.e. ComfyUI's ``cpu=True``).
    """

    def __init__(
        self,
        shape_nhwc: Sequence[int],
        sigma_min: float,
        sigma_max: float,
        seed: int | Sequence[int],
        randn: SeededRandn = cpu_randn,
    ):
        nchw = _nhwc_to_nchw(shape_nhwc)
        lo, hi = np.float32(sigma_min), np.float32(sigma_max)
        self._sign = 1.0 if lo < hi else -1.0
        lo, hi = min(lo, hi), max(lo, hi)
        if isinstance(seed, (int, np.integer)):
            self._trees = [BrownianTree(nchw, float(lo), float(hi), int(seed), randn)]
            self._batched = False
        else:
            seeds = list(seed)
            if len(seeds) != nchw[0]:
                raise ValueError(f"{len(seeds)} Brownian tree seeds for a batch of {nchw[0]}")
            self._trees = [BrownianTree(nchw[1:], float(lo), float(hi), int(s), randn) for s in seeds]
            self._batched = True

    def increment_nchw(self, sigma: float, sigma_next: float) -> np.ndarray:
        """(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), NCHW, rounded as torch does in float32."""
        t0, t1 = np.float32(sigma), np.float32(sigma_next)
        a, b, sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        parts = [tree(float(a), float(b)) for tree in self._trees]
        w = np.stack(parts) if self._batched else parts[0]
        w = w * np.float32(self._sign * sign)
        return w / np.sqrt(np.abs(t1 - t0))

    def __call__(self, sigma: float, sigma_next: float) -> mx.array:
        noise = self.increment_nchw(sigma, sigma_next)
        return mx.array(np.ascontiguousarray(noise.transpose(0, 2, 3, 1)))
