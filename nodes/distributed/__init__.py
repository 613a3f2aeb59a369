"""`sdgraph run` as a distributed sweep: the part that needs MLX and the CLI (the rest: graph/distributed/).

- mlx_world.py: a launched rank joins its mx.distributed group (`detect_world`).
- launch.py: `--distributed -n N` starts N local ranks with `mlx.launch`, each running `python -m cli run ...`
  (cli.main pins the rank's GPU and runs sd.runtime.setup() before anything imports MLX).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from graph.distributed import launched


def cmd_run(args: argparse.Namespace, prepare: Callable, folders: Callable) -> int:
    """`sdgraph run` for a rank (or for the --distributed parent). `prepare(args)` validates every
    variation (raising ValidationFailed), `folders(args)` gives the Folders."""
    prepared = prepare(args)  # everything is validated before anything is launched or run
    if getattr(args, "distributed", False) and not launched():
        from .launch import launch

        return launch(args, prepared, args.ranks, args.backend)
    from graph.distributed.runner import RankEvents, SweepOptions, run_sweep
    from graph.runner import open_executor

    from .mlx_world import detect_world

    world = detect_world()
    opts = SweepOptions(str(args.workflow), quiet=args.quiet, as_json=args.json,
                        only_missing=getattr(args, "only_missing", False),
                        manifest=Path(args.manifest) if getattr(args, "manifest", None) else None)
    with open_executor(getattr(args, "cache_dir", None), getattr(args, "no_cache", False), folders(args),
                       RankEvents(world, args.quiet)) as executor:
        return run_sweep(prepared, executor, world, opts)
