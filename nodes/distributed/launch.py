"""`sdgraph run --distributed -n N`: start N local ranks with `mlx.launch` and report for them.

The ranks run the same `sdgraph run` command (rebuilt from the parsed arguments, without the launch
flags) through `python -m cli`, which pins each rank's GPU before MLX starts. Ranks
listen on 127.0.0.1 only. `mlx.launch` forwards the ranks' output but not their exit status, so the
ranks write progress lines and rank 0's exit status to a private folder (SDGRAPH_DIST_STATUS_DIR):
when no rank 0 result arrives (a rank crashed and the launcher stopped the others), this parent
lists every variation that was not produced, by rank, so it can be re-run with --only-missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from graph.distributed.runner import (
    STATUS_DIR_ENV,
    SweepOptions,
    build_manifest,
    failed_records,
    report,
    shard,
)
from graph.distributed.world import World, nvidia_gpu_count
from graph.runner import PreparedVariation

LAUNCH_FLAGS = ("distributed", "ranks", "backend")


def default_backend() -> str:
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"


def sharing_note(ranks: int, device: str | None = None, gpus: int | None = None,
                 cores: int | None = None) -> str | None:
    """What to tell a user whose local ranks would share one device: a sweep gains only from ranks with a
    device each (one process already keeps a GPU, or all CPU cores, busy). None when each rank has its own."""
    if ranks < 2:
        return None
    if device is None:
        import mlx.core as mx

        device = "cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "cpu"
    if device == "cuda":
        gpus = nvidia_gpu_count() if gpus is None else gpus
        if ranks <= gpus:
            return None
        shared = f"{gpus} GPU{'s' if gpus != 1 else ''}"
    elif device == "metal":
        shared = "this Mac's GPU"
    else:
        shared = f"this machine's {cores or os.cpu_count() or 1} CPU cores"
    return (f"{ranks} ranks share {shared}; one process already keeps it busy, so expect no speed-up "
            f"(2 ranks on a 2-core CPU ran 2.3x slower than one process here). A distributed sweep pays off "
            f"with a GPU per rank or with ranks on several machines (your own mlx.launch)")


def launcher_command() -> list[str]:
    """`mlx.launch` from this interpreter's environment."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    code = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
    return [sys.executable, "-c", code]


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """A first port p such that p .. p+count-1 can all be bound on `host` right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free TCP ports on {host}")


def argv_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   drop: tuple[str, ...] = LAUNCH_FLAGS) -> list[str]:
    """The command line (after the subcommand) that parses back to `args` with `parser`."""
    options: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:
        if action.dest in drop or isinstance(action, argparse._HelpAction) or action.dest.startswith("_"):
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            positionals += [str(v) for v in value] if isinstance(value, list) else [str(value)]
            continue
        opt = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse._StoreTrueAction):
            options += [opt] if value else []
        elif isinstance(action, argparse._StoreFalseAction):
            options += [] if value else [opt]
        elif isinstance(action, argparse._CountAction):
            options += [opt] * int(value or 0)
        elif isinstance(action, argparse._AppendAction):
            options += [f"{opt}={v}" for v in value or []]
        elif value is not None and value != action.default:
            options.append(f"{opt}={value}")
    return [*options, "--", *positionals]


def launch(args: argparse.Namespace, prepared: list[PreparedVariation], ranks: int,
           backend: str | None) -> int:
    """Run the sweep on `ranks` local processes; returns the exit status for the whole run."""
    if ranks < 1:
        raise ValueError("--ranks must be at least 1")
    backend = backend or default_backend()
    note = sharing_note(ranks)
    if note and not args.quiet:
        print(f"note: {note}", file=sys.stderr, flush=True)
    child = [sys.executable, "-m", "cli", "run", *argv_from_args(args._run_parser, args)]
    cmd = [*launcher_command(), "--hosts", "127.0.0.1", "-n", str(ranks), "--backend", backend]
    if backend == "ring":
        cmd += ["--starting-port", str(free_port_range(ranks))]
    elif backend == "nccl":
        cmd += ["--nccl-port", str(free_port_range(1))]
    status_dir = Path(tempfile.mkdtemp(prefix="sdgraph-dist-"))
    env = dict(os.environ, **{STATUS_DIR_ENV: str(status_dir), "SDGRAPH_DIST_BACKEND": backend})
    env.pop("MLX_RANK", None)
    try:
        # stdin: a pipe we never write to. mlx.launch makes its stdin non-blocking (that would leak
        # into a terminal) and polls it (a busy loop on /dev/null).
        proc = subprocess.Popen([*cmd, "--", *child], env=env, stdin=subprocess.PIPE)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            return 130
        finally:
            if proc.stdin:
                proc.stdin.close()
        result = status_dir / "result.json"
        if result.exists():
            return int(json.loads(result.read_text())["code"])
        return _report_lost(args, prepared, status_dir, ranks, backend)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _report_lost(args, prepared: list[PreparedVariation], status_dir: Path, ranks: int, backend: str) -> int:
    """Rank 0 never reported: list what each rank finished and every variation that has no output."""
    per_rank, records, assigned = [], [], {}
    for r in range(ranks):
        lines = _lines(status_dir, r)
        finished = [x for x in lines if x.get("event") == "finished"]
        ids = next((x["ids"] for x in lines if x.get("event") == "assigned"), None)
        assigned[r] = ids
        per_rank.append({"rank": r, "variations": len(ids) if ids is not None else None,
                         "seconds": None, "failed": sum(x["status"] != "ok" for x in finished)})
        records += [x["record"] for x in finished]
    by_id = {pv.variation.id: pv for pv in prepared}
    silent = [r for r, ids in assigned.items() if ids is None]
    reported = [x for r in range(ranks) for x in _lines(status_dir, r) if x.get("event") == "assigned"]
    skipped = reported[0].get("skipped", {}) if reported else {}
    if reported or not getattr(args, "only_missing", False):
        # a rank killed before it wrote its share still had one: the split is deterministic
        todo = [pv.variation.id for pv in prepared if pv.variation.id not in skipped]
        for r in silent:
            assigned[r] = shard(todo, r, ranks)
    made = {x["id"] for x in records}
    lost_by_rank = {r: [i for i in ids if i not in made] for r, ids in assigned.items() if ids is not None}
    world = World(0, ranks, backend, None, True)
    opts = SweepOptions(str(args.workflow), quiet=args.quiet, as_json=args.json,
                        manifest=Path(args.manifest) if getattr(args, "manifest", None) else None)
    gathered = [{"rank": p, "records": [x for x in records if x["rank"] == p["rank"]]} for p in per_rank]
    manifest = build_manifest(prepared, gathered, skipped, world, opts, 0.0,
                              missing_error="its rank stopped before finishing it (crashed or killed)")
    for v in manifest["variations"]:
        if v["status"] == "missing":
            v["rank"] = next((r for r, ids in lost_by_rank.items() if v["id"] in ids), None)
    manifest["failed"] = failed_records(manifest["variations"])  # again: the ranks were filled in above
    manifest.update(status="failed", seconds=None, variations_per_second=None,
                    error="rank 0 did not report: a rank stopped early and the launcher stopped the others")
    print("error: the distributed run did not finish (a rank crashed or was killed):", file=sys.stderr)
    for r in range(ranks):
        ids = lost_by_rank.get(r)
        if r in silent:
            lost = f": {len(ids)} not produced: " + _listing(ids, by_id) if ids else ""
            print(f"  rank {r}: stopped before it started its variations{lost}", file=sys.stderr)
        elif ids:
            print(f"  rank {r}: {len(ids)} not produced: {_listing(ids, by_id)}", file=sys.stderr)
        else:
            print(f"  rank {r}: finished its variations", file=sys.stderr)
    report(manifest, opts)
    return 1


def _listing(ids: list[str], by_id: dict[str, PreparedVariation]) -> str:
    return ", ".join(f"[{i}] " + _sets(by_id[i]) for i in ids)


def _sets(pv: PreparedVariation) -> str:
    return " ".join(f"{k}={v}" for k, v in pv.variation.overrides.items())


def _lines(status_dir: Path, rank: int) -> list[dict]:
    path = status_dir / f"rank-{rank}.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # the last line of a rank killed mid-write
    return out
