"""`python -m graph.distributed run ...`: `sdgraph run` with the distributed flags.

What `--distributed` starts on every rank: it pins the rank's GPU before anything imports MLX, then
runs the normal CLI. Until cli.py wires `add_run_arguments`/`cmd_run` in itself, this also adds them.
"""

from __future__ import annotations

import sys

from .world import pin_local_gpu


def main(argv: list[str] | None = None) -> int:
    pin_local_gpu()  # before `nodes` (and so MLX) is imported
    import cli

    from . import add_run_arguments, cmd_run, handles

    probe = cli.build_parser()
    if "--distributed" not in _run_parser(probe)._option_string_actions:
        build, run = cli.build_parser, cli.COMMANDS["run"]

        def build_parser():
            parser = build()
            add_run_arguments(_run_parser(parser))
            return parser

        def cmd(args):
            return cmd_run(args, cli._prepare, cli._folders) if handles(args) else run(args)

        cli.build_parser = build_parser
        cli.COMMANDS["run"] = cmd
    return cli.main(argv)


def _run_parser(parser):
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["run"]


if __name__ == "__main__":
    sys.exit(main())
