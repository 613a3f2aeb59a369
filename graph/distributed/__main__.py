"""`python -m graph.distributed run ...`: what `--distributed` starts on every rank.

The same as `sdgraph run ...`, but nothing is imported before the rank's GPU is pinned (cli.main pins
it too, before it imports the nodes; this entry does not depend on that order).
"""

from __future__ import annotations

import sys

from .world import pin_local_gpu


def main(argv: list[str] | None = None) -> int:
    pin_local_gpu()  # before `nodes` (and so MLX) is imported
    import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
