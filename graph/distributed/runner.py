"""One rank's share of a sweep, and the one report rank 0 makes of all of them.

- Split: the validated variation list (graph.sweep: deterministic order, stable ids) minus those
  already done is dealt round-robin: rank r runs items r, r+size, r+2*size, ... Every rank computes
  the same split, so no coordination is needed and each variation runs exactly once.
- Run: one Executor per process, so a rank loads its models once and its caches carry over between
  its variations. A variation that fails is recorded (with its node and error) and the rank goes on.
- Names: every variation runs with `run_info["file_tag"]` = its id; sinks put it in their file names
  (`tagged_stem`), so a variation's files are named the same whatever the rank count or timing.
- Done: after a variation succeeds its rank writes `<output>/.sdgraph/done/<id>.json` (the digest of
  the effective workflow and the files). `--only-missing` skips a variation whose marker matches the
  workflow and whose files all exist; ranks pool what they see, so no shared file system is needed.
- Gather: per-variation records travel to rank 0 as JSON bytes through `all_gather`; rank 0 prints
  one summary and writes one manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from graph.context import atomic_path
from graph.executor import Executor, RunEvents
from graph.runner import PreparedVariation, display_path, run_variations

from .naming import FILE_TAG, tagged_stem  # noqa: F401  (tagged_stem: re-exported)
from .world import RankLost, World

T = TypeVar("T")
STATUS_DIR_ENV = "SDGRAPH_DIST_STATUS_DIR"  # set by `--distributed`: ranks report progress there


def shard(items: Sequence[T], rank: int, size: int) -> list[T]:
    """Round-robin: rank r gets items r, r+size, ... (each item exactly once over all ranks)."""
    return list(items[rank::size])


def workflow_digest(pv: PreparedVariation) -> str:
    """Identifies what a variation computes: the effective workflow (overrides applied)."""
    text = json.dumps(pv.workflow.to_data(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Tagged(PreparedVariation):
    def run_info(self) -> dict[str, Any]:
        return super().run_info() | {FILE_TAG: self.variation.id}


def tagged(pv: PreparedVariation) -> PreparedVariation:
    return _Tagged(**{f.name: getattr(pv, f.name) for f in fields(PreparedVariation)})


class DoneMarkers:
    """`<output_dir>/.sdgraph/done/<variation id>.json`: what a finished variation produced."""

    def __init__(self, output_dir: Path):
        self.folder = Path(output_dir) / ".sdgraph" / "done"

    def files_if_done(self, pv: PreparedVariation) -> list[str] | None:
        try:
            data = json.loads((self.folder / f"{pv.variation.id}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("workflow_sha256") != workflow_digest(pv):
            return None
        files = data.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) and Path(f).exists() for f in files):
            return None
        return files

    def mark(self, pv: PreparedVariation, files: list[str]) -> None:
        data = {"id": pv.variation.id, "overrides": pv.variation.overrides,
                "workflow_sha256": workflow_digest(pv), "files": [str(Path(f).resolve()) for f in files]}
        with contextlib.suppress(OSError), atomic_path(self.folder / f"{pv.variation.id}.json") as tmp:
            tmp.write_text(json.dumps(data, indent=1))


@dataclass
class SweepOptions:
    workflow: str
    quiet: bool = False
    as_json: bool = False
    only_missing: bool = False
    manifest: Path | None = None


class RankEvents(RunEvents):
    """Per-rank terminal output: one line per variation and node logs on stderr, with the rank."""

    def __init__(self, world: World, quiet: bool):
        self.prefix = f"[rank {world.rank}] " if world.size > 1 else ""
        self.quiet = quiet

    def log(self, node_id: str, message: str) -> None:
        if not self.quiet:
            print(f"{self.prefix}[{node_id}] {message}", file=sys.stderr, flush=True)

    def warning(self, message: str) -> None:
        print(f"{self.prefix}warning: {message}", file=sys.stderr, flush=True)

    def line(self, message: str) -> None:
        if not self.quiet:
            print(f"{self.prefix}{message}", file=sys.stderr, flush=True)


class _StatusLog:
    """Progress lines for the `--distributed` parent (a local folder), so it can tell what a rank that
    died had left undone. Absent when launched by anything else."""

    def __init__(self, world: World):
        folder = os.environ.get(STATUS_DIR_ENV)
        self.path = Path(folder) / f"rank-{world.rank}.jsonl" if folder else None
        self.result = Path(folder) / "result.json" if folder and world.is_root else None

    def write(self, **record: Any) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self, code: int) -> None:
        if self.result is not None:
            with contextlib.suppress(OSError), atomic_path(self.result) as tmp:
                tmp.write_text(json.dumps({"code": code}))


def run_sweep(prepared: list[PreparedVariation], executor: Executor, world: World,
              opts: SweepOptions) -> int:
    """Run this rank's share; rank 0 reports all. Returns the exit status (rank 0: 1 if any variation
    failed; other ranks 0, since rank 0 reports their failures)."""
    start = time.perf_counter()
    events = executor.events if isinstance(executor.events, RankEvents) else RankEvents(world, opts.quiet)
    status = _StatusLog(world)
    markers = DoneMarkers(executor.folders.output_dir)

    done: dict[str, list[str]] = {}
    if opts.only_missing:
        seen = {pv.variation.id: files for pv in prepared if (files := markers.files_if_done(pv)) is not None}
        try:
            parts = world.all_gather_json(seen)
        except RankLost as e:
            print(f"error: {e}; no variation was run", file=sys.stderr, flush=True)
            return 1
        for part in parts:
            done.update(part)
    todo = [pv for pv in prepared if pv.variation.id not in done]
    mine = shard(todo, world.rank, world.size)
    status.write(event="assigned", ids=[pv.variation.id for pv in mine], skipped=done)
    if world.size > 1:
        ids = " ".join(pv.variation.id for pv in mine) or "none"
        events.line(f"{len(mine)} of {_count(len(todo), 'variation')}: {ids}")

    records = []
    with _sigterm_as_interrupt(world.is_launched):
        outcomes = run_variations(executor, [tagged(pv) for pv in mine], keep_going=True)
        for i, outcome in enumerate(outcomes):
            pv = outcome.pv
            record = outcome.record(rank=world.rank)
            if outcome.ok:
                markers.mark(pv, outcome.result.files)
            records.append(record)
            status.write(event="finished", id=record["id"], status=record["status"], record=record)
            sets = " ".join(f"{k}={v}" for k, v in pv.variation.overrides.items())
            outcome = "ok" if record["status"] == "ok" else f"FAILED: {record['error']}"
            events.line(f"{i + 1}/{len(mine)} [{pv.variation.id}] {sets}: {outcome} "
                        f"({record['seconds']:.2f} s)")
    rank_info = {"rank": world.rank, "variations": len(mine),
                 "seconds": round(time.perf_counter() - start, 4),
                 "failed": sum(r["status"] != "ok" for r in records)}

    try:
        gathered = world.all_gather_json({"rank": rank_info, "records": records})
    except RankLost as e:
        lost = [r["id"] for r in records if r["status"] == "ok"]
        print(f"error: {e}; another rank stopped, so there is no summary. This rank finished "
              f"{len(lost)} of its {_count(len(mine), 'variation')} ({' '.join(lost) or 'none'}); "
              "re-run with "
              "--only-missing for the rest", file=sys.stderr, flush=True)
        return 1
    code = 0
    if world.is_root:
        manifest = build_manifest(prepared, gathered, done, world, opts, time.perf_counter() - start)
        code = 0 if manifest["status"] == "ok" else 1
        report(manifest, opts)
        status.finish(code)
    world.barrier()  # nobody exits (and gets its launcher to stop the others) before rank 0 reported
    # Under --distributed the parent takes the status from status.finish(); a non-zero exit here would
    # only make mlx.launch kill ranks that are still shutting down. Other ranks' failures are in rank
    # 0's report, so they exit 0.
    return 0 if status.result is not None else code


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool):
    """While variations run, treat SIGTERM (what mlx.launch sends the other ranks when one fails) as
    Ctrl-C, so the running variation removes its partial files. Only then: a rank blocked in a
    collective never returns to Python to run a handler, and must die on the spot, or the launcher
    (which waits for it) would hang."""
    if not enabled:
        yield
        return
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_manifest(prepared: list[PreparedVariation], gathered: list[dict], done: dict[str, list[str]],
                   world: World, opts: SweepOptions, seconds: float,
                   missing_error: str = "no rank reported it") -> dict:
    by_id = {r["id"]: r for part in gathered for r in part["records"]}
    variations = []
    for pv in prepared:
        vid = pv.variation.id
        if vid in by_id:
            variations.append(by_id[vid])
        elif vid in done:
            variations.append(pv.variation.to_data() | {"rank": None, "status": "skipped",
                                                        "files": [display_path(f) for f in done[vid]]})
        else:  # its rank died (see launch.py), or ranks disagreed on the variation list
            variations.append(pv.variation.to_data() | {"rank": None, "status": "missing", "files": [],
                                                        "error": missing_error})
    failed = failed_records(variations)
    ran = sum(v["status"] == "ok" for v in variations)
    return {
        "status": "failed" if failed else "ok",
        "workflow": opts.workflow,
        "distributed": {"ranks": world.size, "backend": world.backend,
                        "per_rank": [part["rank"] for part in gathered]},
        "seconds": round(seconds, 4),
        "counts": {"variations": len(variations), "ran": ran, "skipped": len(done), "failed": len(failed)},
        "variations_per_second": round(ran / seconds, 4) if seconds > 0 else None,
        "variations": variations,
        "files": [f for v in variations for f in v["files"]],
        "failed": failed,
    }


def failed_records(variations: list[dict]) -> list[dict]:
    """The manifest's "failed" list: the variations that failed or that no rank reported."""
    return [{k: v.get(k) for k in ("index", "id", "overrides", "rank", "error", "failed_node")}
            for v in variations if v["status"] in ("failed", "missing")]


def report(manifest: dict, opts: SweepOptions) -> None:
    text = json.dumps(manifest, indent=2)
    if opts.manifest is not None:
        with atomic_path(opts.manifest) as tmp:
            tmp.write_text(text + "\n")
    if opts.as_json:
        print(text, flush=True)
        _print_failures(manifest)
        return
    if opts.quiet:
        for f in manifest["files"]:
            print(f)
        _print_failures(manifest)
        sys.stdout.flush()
        return
    c, d = manifest["counts"], manifest["distributed"]
    print(f"{manifest['workflow']}: {_count(c['variations'], 'variation')} on {d['ranks']} rank"
          f"{'s' if d['ranks'] != 1 else ''} ({d['backend']}) in {manifest['seconds']:.2f} s: "
          f"{c['ran']} ran, {c['skipped']} already done, {c['failed']} failed")
    for part in d["per_rank"]:
        print(f"  rank {part['rank']}: {_count(part['variations'], 'variation')}, {part['failed']} failed, "
              f"{part['seconds']:.2f} s")
    for v in manifest["variations"]:
        sets = " ".join(f"{k}={val}" for k, val in v["overrides"].items())
        where = f"rank {v['rank']}" if v["rank"] is not None else v["status"]
        for f in v["files"]:
            print(f"output: {f}  [{v['id']}] {sets} ({where})")
    _print_failures(manifest)
    sys.stdout.flush()


def _print_failures(manifest: dict) -> None:
    if not manifest["failed"]:
        return
    print(f"{len(manifest['failed'])} variation(s) failed:", file=sys.stderr)
    for f in manifest["failed"]:
        sets = " ".join(f"{k}={v}" for k, v in f["overrides"].items())
        print(f"  [{f['id']}] {sets} (rank {f['rank']}): {f['error']}", file=sys.stderr)
    print("re-run the same command with --only-missing to run only the variations without outputs",
          file=sys.stderr, flush=True)


def _count(n: int, noun: str) -> str:
    """'1 variation', '2 variations'."""
    return f"{n} {noun}{'s' if n != 1 else ''}"
