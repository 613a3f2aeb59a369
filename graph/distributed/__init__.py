"""Distributed sweeps: a sweep's variations split over ranks, one report (the engine's side; no MLX).

Two ways in:
- `mlx.launch -n 2 -- sdgraph run wf.yaml --sweep ...` (or any launcher MLX supports): each rank
  sees the launcher's environment (`world.launched()`), joins the group and runs its share.
- `sdgraph run wf.yaml --sweep ... --distributed -n 2 [--backend ring|nccl|mpi]`: validates, then
  starts `mlx.launch` on 127.0.0.1 itself and reports even when a rank dies.

`--only-missing` (distributed or not) skips variations that a previous run finished. In these runs a
sink names its files by variation id (`tagged_stem`), so names do not depend on the rank count.
Here, pure Python: the launcher's environment and the World (world.py), the split, the naming, the done
markers and the manifest (runner.py, naming.py), and the `sdgraph run` flags. The part that needs MLX and
the CLI (joining an mx.distributed group, starting `mlx.launch`, the rank's command) is nodes/distributed/.

The CLI calls `add_run_arguments(run_parser)` and, in `run`, `nodes.distributed.cmd_run(args, prepare,
folders)` when `handles(args)`.
"""

from __future__ import annotations

import argparse

from .naming import FILE_TAG, tagged_stem
from .world import World, launched, pin_local_gpu

# Only light modules are imported here (the CLI builds its parser with add_run_arguments on every
# start, and sinks import tagged_stem); runner.py loads when a distributed run starts.
__all__ = ["FILE_TAG", "World", "add_run_arguments", "handles", "launched", "pin_local_gpu", "tagged_stem"]


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The distributed flags of `sdgraph run`."""
    group = run.add_argument_group("distributed sweeps (mlx.distributed)")
    group.add_argument("--distributed", action="store_true",
                       help="split the variations over N local processes started with mlx.launch "
                            "(or launch `sdgraph run` under mlx.launch yourself)")
    group.add_argument("-n", "--ranks", type=_positive_int, default=2, metavar="N",
                       help="processes for --distributed (default 2); one GPU each where there are several")
    group.add_argument("--backend", choices=("ring", "nccl", "mpi"), default=None,
                       help="for --distributed: ring (TCP on 127.0.0.1), nccl or mpi "
                            "(default: nccl with CUDA, else ring)")
    group.add_argument("--only-missing", action="store_true",
                       help="skip variations a previous run already finished (their files still exist)")
    group.add_argument("--manifest", metavar="FILE",
                       help="also write the JSON summary (every file with its variation and rank) to FILE")
    run.set_defaults(_run_parser=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def handles(args: argparse.Namespace) -> bool:
    """Whether `sdgraph run` goes through the distributed runner."""
    return bool(getattr(args, "distributed", False) or getattr(args, "only_missing", False)
                or getattr(args, "manifest", None) or launched())
