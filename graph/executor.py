"""Execution: decide from cache keys what must run, then run only that, in topological order.

Deciding walks back from the output nodes: a node whose result is in the memory cache or the disk
store is a hit and its inputs are not visited, so nothing upstream of a hit runs (the text encoder is
never loaded when its encodings are cached). Everything is decided, and hits are loaded, before the
first node runs. A failed or cancelled run removes every file its nodes registered.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph.context import ExecutionContext, Folders, remove_stale_temps
from graph.disk_cache import CorruptEntry, DiskCache, Entry, default_cache_dir, make_private_dir, warn_once
from graph.errors import Cancelled, GraphError, NodeFailed
from graph.fingerprint import FingerprintIndex
from graph.memory_cache import MemoryCache, value_size
from graph.plan import Plan, PlannedNode

RAN, MEMORY, DISK, NOT_NEEDED, FAILED = "ran", "memory cache", "disk cache", "not needed", "failed"


class RunEvents:
    """Hooks the CLI implements (progress bars, logging). Defaults do nothing."""

    def node_started(self, node_id: str, node_type: str) -> None: ...
    def node_finished(self, report: NodeReport) -> None: ...
    def progress(self, node_id: str, step: int, total: int) -> None: ...
    def log(self, node_id: str, message: str) -> None: ...
    def warning(self, message: str) -> None: ...


@dataclass
class NodeReport:
    id: str
    type: str
    status: str
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def to_data(self) -> dict:
        """The node's row of a run summary (--json, the distributed manifest)."""
        return {"id": self.id, "type": self.type, "status": self.status, "seconds": round(self.seconds, 4)}


@dataclass
class RunResult:
    nodes: list[NodeReport]
    files: list[str]                       # every output file of the run (written now or earlier)
    values: dict[str, tuple] = field(default_factory=dict)  # outputs of the nodes that were needed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.nodes:
            out[r.status] = out.get(r.status, 0) + 1
        return out


@dataclass
class _Cached:
    values: tuple
    files: list[str]


class Caches:
    """The caches shared by every run in this process (so a sweep's variations hit each other)."""

    def __init__(self, cache_dir: Path, disk: DiskCache | None, memory: MemoryCache | None = None,
                 use_memory: bool = True):
        self.cache_dir = cache_dir
        self.disk = disk
        self.memory = memory if memory is not None else MemoryCache(None if use_memory else 0)
        self.fingerprints = FingerprintIndex(cache_dir / "fingerprints.json" if disk else None)


def open_caches(cache_dir: str | Path | None, no_cache: bool = False
                ) -> tuple[Caches, tempfile.TemporaryDirectory | None]:
    """A run's caches: `cache_dir` (default: default_cache_dir()) with its disk store, or with
    `no_cache` a throwaway folder and no disk store. The second value is that throwaway folder (keep it
    alive while the caches are used; cleanup() removes it), else None."""
    if no_cache:
        tmp = tempfile.TemporaryDirectory(prefix="sdgraph-nocache-")
        return Caches(Path(tmp.name), None), tmp
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        make_private_dir(root)
    except OSError as e:  # a file where the folder should be, no permission: run without the disk cache
        warn_once(f"disk cache {root} cannot be used ({type(e).__name__}: {e}); running without it")
        tmp = tempfile.TemporaryDirectory(prefix="sdgraph-nocache-")
        return Caches(Path(tmp.name), None), tmp
    disk = DiskCache(root)
    disk.clean_temps()
    return Caches(root, disk), None


class Executor:
    def __init__(self, caches: Caches, folders: Folders, events: RunEvents | None = None):
        self.caches = caches
        self.folders = folders
        self.events = events or RunEvents()
        self.cancel_event = threading.Event()
        self._cleaned: set[Path] = set()

    def cancel(self) -> None:
        """Ask the running nodes to stop at their next ctx.progress()/check_cancelled()."""
        self.cancel_event.set()

    def run(self, plan: Plan, run_info: dict[str, Any] | None = None) -> RunResult:
        out = Path(self.folders.output_dir)
        if out not in self._cleaned:  # hidden temp files a killed run left in the output folder
            self._cleaned.add(out)
            remove_stale_temps(out, depth=2)
        run = _Run(self, plan, run_info or {})
        return run.execute()


class _Run:
    def __init__(self, ex: Executor, plan: Plan, run_info: dict[str, Any]):
        self.ex, self.plan, self.run_info = ex, plan, run_info
        self.values: dict[str, tuple] = {}
        self.reports: dict[str, NodeReport] = {}
        self.written: list[Path] = []

    def execute(self) -> RunResult:
        to_run: set[str] = set()
        for node_id in self.plan.outputs:
            self._decide(node_id, to_run)
        try:
            for node_id in self.plan.order:
                if node_id in to_run:
                    self._run_node(self.plan.nodes[node_id])
        except BaseException:
            self._remove_written()
            raise
        every = self.plan.order + self.plan.unreachable
        ordered = [self.reports.get(n) or NodeReport(n, self.plan.types[n], NOT_NEEDED) for n in every]
        files = [f for n in self.plan.outputs for f in self.reports[n].files]
        return RunResult(ordered, files, dict(self.values))

    # -- deciding ---------------------------------------------------------------------------------

    def _decide(self, node_id: str, to_run: set[str]) -> None:
        # a stack, not recursion: a chain of thousands of nodes must not hit Python's recursion limit
        stack = [node_id]
        while stack:
            node_id = stack.pop()
            if node_id in to_run or node_id in self.values:
                continue
            pn = self.plan.nodes[node_id]
            if self._load_cached(pn):
                continue
            to_run.add(node_id)
            stack.extend(reversed([src for src, _ in pn.node.links.values()]))

    def _load_cached(self, pn: PlannedNode) -> bool:
        spec = pn.node.spec
        if spec.cache_tier == "never" or spec.volatile:
            return False
        start = time.perf_counter()
        cached = self.ex.caches.memory.get(pn.key)
        status = MEMORY
        if cached is None or not self._files_usable(pn, cached.files):
            cached, status = self._load_from_disk(pn), DISK
        if cached is None:
            return False
        self.values[pn.id] = cached.values
        self.reports[pn.id] = NodeReport(pn.id, spec.type_name, status, time.perf_counter() - start,
                                         list(cached.files))
        self.ex.events.node_finished(self.reports[pn.id])
        return True

    def _load_from_disk(self, pn: PlannedNode) -> _Cached | None:
        disk, spec = self.ex.caches.disk, pn.node.spec
        if disk is None or spec.cache_tier != "disk":
            return None
        try:
            entry = disk.get(pn.key)
        except CorruptEntry as e:
            self.ex.events.warning(f"cache entry for node '{pn.id}' ({spec.type_name}) is corrupt ({e}); "
                                   "recomputing it")
            return None
        if entry is None or not self._files_usable(pn, entry.files):
            return None
        if entry.types != [o.type.name for o in spec.outputs]:
            return None  # declared outputs changed without a version bump: treat as a miss
        try:
            values = tuple(o.type.from_bytes(blob) for o, blob in zip(spec.outputs, entry.blobs, strict=True))
        except Exception as e:  # a serializer that cannot read its own bytes: same as a corrupt entry
            self.ex.events.warning(f"cache entry for node '{pn.id}' could not be decoded ({e}); "
                                   "recomputing it")
            return None
        cached = _Cached(values, entry.files)
        self._remember_in_memory(pn, cached)
        return cached

    def _files_usable(self, pn: PlannedNode, files: list[str]) -> bool:
        """A cached result stands for its files only while they exist and, for a sink, lie in this run's
        output folder: a run with another --output-dir re-runs the sink (from cached upstream values),
        so its outputs land where this run was asked to put them. The output folder is no part of any
        cache key, so upstream nodes still hit."""
        if not _files_exist(files):
            return False
        if not pn.node.spec.is_output or not files:
            return True
        root = Path(self.ex.folders.output_dir).resolve()
        return all(root == p or root in p.parents for p in (Path(f).resolve() for f in files))

    # -- running ----------------------------------------------------------------------------------

    def _run_node(self, pn: PlannedNode) -> None:
        spec = pn.node.spec
        kwargs = dict(pn.node.literals)
        for name, (src, index) in pn.node.links.items():
            kwargs[name] = self.values[src][index]
        ctx = None
        if spec.wants_ctx:
            ctx = ExecutionContext(
                pn.id, spec.type_name, self.ex.folders, self.run_info, self.ex.caches.cache_dir,
                on_progress=self.ex.events.progress, on_log=self.ex.events.log,
                cancel_event=self.ex.cancel_event, fingerprinter=self.ex.caches.fingerprints.fingerprint)
            kwargs["ctx"] = ctx
        self.ex.events.node_started(pn.id, spec.type_name)
        start = time.perf_counter()
        try:
            if self.ex.cancel_event.is_set():
                raise Cancelled("cancelled")
            result = spec.fn(**kwargs)
            values = _as_tuple(result, len(spec.outputs))
        except (Cancelled, KeyboardInterrupt):
            self._collect(ctx)
            raise
        except GraphError as e:
            self._collect(ctx)
            if isinstance(e, NodeFailed):
                raise
            raise NodeFailed(pn.id, spec.type_name, e) from e
        except Exception as e:
            self._collect(ctx)
            if self.ex.cancel_event.is_set():  # e.g. the model code's own Cancelled after ctx.is_cancelled()
                raise Cancelled("cancelled") from e
            raise NodeFailed(pn.id, spec.type_name, e) from e
        seconds = time.perf_counter() - start
        files = [str(Path(p).resolve()) for p in self._collect(ctx)]
        self.values[pn.id] = values
        self.reports[pn.id] = NodeReport(pn.id, spec.type_name, RAN, seconds, files)
        self._store(pn, _Cached(values, files))
        self.ex.events.node_finished(self.reports[pn.id])

    def _collect(self, ctx: ExecutionContext | None) -> list[Path]:
        files = list(ctx.written_files) if ctx else []
        self.written.extend(files)
        return files

    def _store(self, pn: PlannedNode, cached: _Cached) -> None:
        spec = pn.node.spec
        if spec.cache_tier == "never" or spec.volatile:
            return
        self._remember_in_memory(pn, cached)
        disk = self.ex.caches.disk
        if disk is None or spec.cache_tier != "disk":
            return
        try:
            blobs = [o.type.to_bytes(v) for o, v in zip(spec.outputs, cached.values, strict=True)]
        except Exception as e:  # a serializer that cannot write this value: same as a failed write
            self.ex.events.warning(f"could not serialize the outputs of node '{pn.id}' ({spec.type_name}) "
                                   f"for the disk cache ({type(e).__name__}: {e})")
            return
        try:
            disk.put(pn.key, Entry([o.type.name for o in spec.outputs], blobs, cached.files))
        except OSError as e:  # a full or read-only disk costs a cache entry, not the run
            self.ex.events.warning(f"could not write the disk cache for node '{pn.id}': {e}")

    def _remember_in_memory(self, pn: PlannedNode, cached: _Cached) -> None:
        outputs = pn.node.spec.outputs
        size = sum(value_size(v, o.type.nbytes) for o, v in zip(outputs, cached.values, strict=True))
        self.ex.caches.memory.put(pn.key, cached, size)

    def _remove_written(self) -> None:
        for path in self.written:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                Path(path).unlink()


def _as_tuple(result: Any, n_outputs: int) -> tuple:
    if n_outputs == 0:
        return ()
    if n_outputs == 1:
        return (result,)
    if not isinstance(result, tuple) or len(result) != n_outputs:
        raise TypeError(f"returned {type(result).__name__}, but declares {n_outputs} outputs "
                        "(return a tuple)")
    return result


def _files_exist(files: list[str]) -> bool:
    return all(Path(f).exists() for f in files)
