"""The World of a launched rank, joined through mlx.distributed (graph/distributed/world.py has the rest).

Collectives are used for control data only (which variations are done, what each rank produced):
bytes are padded to the longest rank's length and exchanged with `all_gather`, so no shared file
system is needed.
"""

from __future__ import annotations

from typing import Any

from graph.distributed.world import RankLost, World, backend_from_env, expected_size, launched

MAX_GATHER_BYTES = 1 << 30


class MLXCollectives:
    """`all_gather_bytes` over an mx.distributed group."""

    def __init__(self, group: Any):
        self.group = group

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        import mlx.core as mx
        import numpy as np

        rank, size = self.group.rank(), self.group.size()
        lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=self.group)
        lengths = [int(n) for n in np.array(lengths).reshape(-1)]
        if len(lengths) != size or any(n < 0 or n > MAX_GATHER_BYTES for n in lengths):
            raise RankLost(f"rank {rank}: the gather returned nonsense lengths {lengths[:8]}")
        words = max(1, -(-max(lengths) // 4))  # int32 words: every backend reduces and gathers int32
        padded = np.zeros(words * 4, dtype=np.uint8)
        padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        gathered = mx.distributed.all_gather(mx.array(padded.view(np.int32)), group=self.group)
        rows = np.array(gathered).reshape(size, words).view(np.uint8)
        return [rows[r, :lengths[r]].tobytes() for r in range(size)]


def detect_world() -> World:
    """This process's World: a lone one unless a launcher started it, else the group it joins."""
    if not launched():
        return World()
    import mlx.core as mx

    backend = backend_from_env()
    if expected_size() == 1:  # e.g. `mlx.launch -n 1`: its ring description is empty; nobody to join
        return World(0, 1, backend, None, True)
    requested = backend if backend in ("ring", "mpi", "nccl", "jaccl") else "any"
    try:
        group = mx.distributed.init(strict=False, backend=requested)
    except RuntimeError:
        group = mx.distributed.init(strict=False)
    world = World(group.rank(), group.size(), backend, MLXCollectives(group), True)
    expected = expected_size()
    if expected is not None and expected != world.size:
        raise RuntimeError(f"the launcher started {expected} ranks but the {backend} backend joined "
                           f"{world.size}; check the backend's environment variables")
    return world
