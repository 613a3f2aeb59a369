"""Who am I among the launched processes (read from the launcher's environment), and the World a sweep
runs in: rank, size and the few collectives it needs, through a `Collectives` object that the caller
provides (nodes/distributed/mlx_world.py joins mlx.distributed; nothing here imports MLX).

A process counts as launched when the environment of a distributed launcher is present: `MLX_RANK`
(set by `mlx.launch` for the ring, NCCL and JACCL backends, or by hand), or the rank variables of
`mpirun` (Open MPI, MPICH/PMI). Only then does nodes.distributed join a group; a plain `sdgraph run`
never touches the distributed layer.

Collectives are used for control data only (which variations are done, what each rank produced):
bytes are padded to the longest rank's length and exchanged with `all_gather`, so no shared file
system is needed. On a single-rank group every collective is the identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by a distributed launcher (even with a world of one)."""
    return "MLX_RANK" in os.environ or any(v in os.environ for v in _MPI_RANK_VARS)


def backend_from_env() -> str:
    """The backend the launcher prepared for (a best guess from its environment variables)."""
    env = os.environ
    if env.get("SDGRAPH_DIST_BACKEND"):
        return env["SDGRAPH_DIST_BACKEND"]
    if "NCCL_HOST_IP" in env or "MLX_WORLD_SIZE" in env:
        return "nccl"
    if "MLX_JACCL_COORDINATOR" in env:
        return "jaccl"
    if any(v in env for v in _MPI_RANK_VARS):
        return "mpi"
    if "MLX_HOSTFILE" in env:
        return "ring"
    return "any"


def local_rank() -> int:
    """This process's index among the ranks on its own host.

    mpirun says so directly; for `mlx.launch`'s ring backend it is the number of earlier ranks whose
    listening address (from the MLX_HOSTFILE ring description) is on the same IP as ours."""
    for var in _MPI_LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    rank = int(os.environ.get("MLX_RANK", "0"))
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:
        try:
            ring = json.loads(Path(hostfile).read_text() or "[]")
            ips = [addrs[0].rsplit(":", 1)[0] if addrs else "" for addrs in ring]
            if rank < len(ips):
                return sum(1 for ip in ips[:rank] if ip == ips[rank])
        except (OSError, ValueError, TypeError, AttributeError, IndexError):
            pass
    return rank


def expected_size() -> int | None:
    """How many ranks the launcher started, where its environment says so."""
    for var in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and "MLX_JACCL_COORDINATOR" not in os.environ:
        try:
            text = Path(hostfile).read_text().strip()
            return len(json.loads(text)) if text else 1
        except (OSError, ValueError, TypeError):
            return None
    return None


def nvidia_gpu_count() -> int:
    """GPUs the NVIDIA driver exposes on this host (0 without one); reads no CUDA state."""
    folder = Path("/proc/driver/nvidia/gpus")
    try:
        return sum(1 for _ in folder.iterdir())
    except OSError:
        return 0


def pin_local_gpu() -> int | None:
    """Give each rank of a host its own GPU: set CUDA_VISIBLE_DEVICES to local_rank % GPUs.

    Must run before MLX initialises CUDA (so before `nodes` is imported). `mlx.launch --backend nccl`
    already sets CUDA_VISIBLE_DEVICES per rank; this covers the ring and MPI backends on a host with
    several GPUs. Leaves an existing CUDA_VISIBLE_DEVICES alone; no-op on Macs and CPU-only hosts.
    Returns the GPU index chosen, or None."""
    if not launched() or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    count = nvidia_gpu_count()
    if count < 2:
        return None
    index = local_rank() % count
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return index


class RankLost(RuntimeError):
    """A collective failed or returned garbage: another rank has gone (the ring backend hands back
    whatever it had rather than raising when a peer's socket closes)."""


class Collectives(Protocol):
    """What a World needs from its communication layer (nodes.distributed.mlx_world has mlx.distributed's)."""

    def all_gather_bytes(self, data: bytes) -> list[bytes]: ...


@dataclass
class World:
    rank: int = 0
    size: int = 1
    backend: str = "none"
    group: Collectives | None = None  # None for a lone process
    is_launched: bool = False   # started by a launcher (a world of one still names files by variation)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank."""
        if self.size == 1 or self.group is None:
            return [data]
        return self.group.all_gather_bytes(data)

    def all_gather_json(self, value: Any) -> list[Any]:
        parts = self.all_gather_bytes(json.dumps(value).encode())
        try:
            return [json.loads(b) for b in parts]
        except ValueError as e:  # incl. UnicodeDecodeError
            raise RankLost(f"rank {self.rank}: the gather returned unreadable data ({e})") from e

    def barrier(self) -> None:
        if self.size > 1 and self.group is not None:
            self.all_gather_bytes(b"")
