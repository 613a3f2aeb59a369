"""One executor behind a bounded queue: the main thread takes prompts in order and runs each through the
same Executor (so memory and disk caches carry over: a new seed re-runs the sampler onward only), turning
the engine's events into ComfyUI's messages, with the submitted node ids. History is bounded too."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path

from graph.errors import Cancelled, NodeFailed
from graph.executor import DISK, MEMORY, Executor, NodeReport, RunEvents
from graph.runner import run_variation
from nodes.server.prompts import Job

Send = Callable[[str, dict, "str | None"], None]   # (event, data, client id or None for everyone)
PREVIEW_LOG = "preview: "                           # what PreviewImage logs for each file it writes


def now_ms() -> int:
    return int(time.time() * 1000)


class QueueFull(Exception):
    pass


class PromptQueue:
    """Pending prompts (bounded), the running ones (one per worker), and the history of finished ones
    (bounded)."""

    def __init__(self, max_pending: int = 100, max_history: int = 1000):
        self.max_pending, self.max_history = max_pending, max_history
        self.lock = threading.Condition()
        self.pending: collections.deque[Job] = collections.deque()
        self.running: dict[str, Job] = {}   # prompt_id -> job, in the order they started
        self.history: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.counter = 0
        self.closed = False

    def next_number(self, front: bool = False) -> int:
        with self.lock:
            self.counter += 1
            return -self.counter if front else self.counter

    def put(self, job: Job, front: bool = False) -> None:
        with self.lock:
            if len(self.pending) >= self.max_pending:
                raise QueueFull(f"the queue holds {self.max_pending} prompts already")
            self.pending.appendleft(job) if front else self.pending.append(job)
            self.lock.notify()

    def take(self) -> Job | None:
        """The next prompt, waiting for one; None once closed."""
        with self.lock:
            while not self.pending and not self.closed:
                self.lock.wait()
            if self.closed:
                return None
            job = self.pending.popleft()
            self.running[job.prompt_id] = job
            return job

    def finish(self, job: Job, record: dict) -> None:
        with self.lock:
            self.running.pop(job.prompt_id, None)
            self.history[job.prompt_id] = record
            while len(self.history) > self.max_history:
                self.history.popitem(last=False)

    def remaining(self) -> int:
        with self.lock:
            return len(self.pending) + len(self.running)

    def snapshot(self) -> tuple[list[list], list[list]]:
        with self.lock:
            return [j.entry() for j in self.running.values()], [j.entry() for j in self.pending]

    def delete(self, prompt_ids) -> None:
        with self.lock:
            wanted = {str(i) for i in prompt_ids}
            self.pending = collections.deque(j for j in self.pending if j.prompt_id not in wanted)

    def clear(self) -> None:
        with self.lock:
            self.pending.clear()

    def history_items(self, max_items: int | None = None, prompt_id: str | None = None) -> dict:
        with self.lock:
            if prompt_id is not None:
                return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
            items = list(self.history.items())
            if max_items is not None:
                items = items[-max_items:] if max_items > 0 else []
            return dict(items)

    def delete_history(self, prompt_ids=None) -> None:
        with self.lock:
            if prompt_ids is None:
                self.history.clear()
            for i in prompt_ids or ():
                self.history.pop(str(i), None)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()


class _JobEvents(RunEvents):
    """The engine's events for one prompt, as ComfyUI's messages."""

    def __init__(self, job: Job, send: Send, image_ref: Callable[[str, str], dict | None]):
        self.job, self.send, self.image_ref = job, send, image_ref
        self.messages: list[list] = []
        self.cached: list[str] = []
        self.cached_flushed = False
        self.executed: list[str] = []
        self.current: str | None = None
        self.outputs: dict[str, dict] = {}
        self.previews: dict[str, list[str]] = {}
        self.pending_outputs: list[tuple[str, dict]] = []

    def emit(self, event: str, data: dict, record: bool = False) -> None:
        data = data | {"prompt_id": self.job.prompt_id}
        if record:
            self.messages.append([event, data])
        self.send(event, data, self.job.client_id)

    def cid(self, node_id: str) -> str:
        return self.job.to_comfy.get(node_id, node_id)

    def flush_cached(self) -> None:
        if self.cached_flushed:
            return
        self.cached_flushed = True
        self.emit("execution_cached", {"nodes": list(self.cached), "timestamp": now_ms()}, record=True)
        for cid, output in self.pending_outputs:  # a cached sink still shows its images
            self.emit("executed", {"node": cid, "display_node": cid, "output": output})
        self.pending_outputs.clear()

    def node_started(self, node_id: str, node_type: str) -> None:
        self.flush_cached()
        self.current = self.cid(node_id)
        self.emit("executing", {"node": self.current, "display_node": self.current})

    def progress(self, node_id: str, step: int, total: int) -> None:
        self.emit("progress", {"value": step, "max": total, "node": self.cid(node_id)})

    def log(self, node_id: str, message: str) -> None:
        if message.startswith(PREVIEW_LOG):
            self.previews.setdefault(node_id, []).append(message[len(PREVIEW_LOG):])

    def node_finished(self, report: NodeReport) -> None:
        cid = self.cid(report.id)
        images = [ref for f in report.files if (ref := self.image_ref(f, "output"))]
        images += [ref for f in self.previews.pop(report.id, []) if (ref := self.image_ref(f, "temp"))]
        output = {"images": images} if images else None
        if output:
            self.outputs[cid] = output
        if report.status in (MEMORY, DISK):
            self.cached.append(cid)
            if output:
                self.pending_outputs.append((cid, output))
            return
        self.executed.append(cid)
        if output:
            self.emit("executed", {"node": cid, "display_node": cid, "output": output})


class Worker:
    """Runs queued prompts one after another through `executor`, in the thread that calls run(): the main
    thread, as in `sdgraph run`, so MLX, signals and the engine's interrupt handling work as they do there."""

    def __init__(self, queue: PromptQueue, executor: Executor, send: Send,
                 image_ref: Callable[[str, str], dict | None]):
        self.queue, self.executor, self.send, self.image_ref = queue, executor, send, image_ref
        self.events: _JobEvents | None = None

    def send_status(self) -> None:
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}}, None)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompt (only if it is `prompt_id`, when given) at its next step."""
        running = list(self.queue.running)
        if not running or (prompt_id and prompt_id not in running):
            return False
        self.executor.cancel()
        return True

    def run(self) -> None:
        while (job := self.queue.take()) is not None:
            record = self.run_job(job)
            self.queue.finish(job, record)
            self.send("executing", {"node": None, "display_node": None, "prompt_id": job.prompt_id},
                      job.client_id)  # ComfyUI's legacy "done" signal
            self.send_status()

    def run_job(self, job: Job) -> dict:
        self.executor.cancel_event.clear()
        ev = self.events = _JobEvents(job, self.send, self.image_ref)
        self.executor.events = ev
        ev.emit("execution_start", {"timestamp": now_ms()}, record=True)
        status, completed, stopping = "success", True, None
        try:
            run_variation(self.executor, job.prepared)
            ev.flush_cached()
            ev.emit("execution_success", {"timestamp": now_ms()}, record=True)
        except (Cancelled, KeyboardInterrupt) as e:
            ev.flush_cached()
            stopping = e if isinstance(e, KeyboardInterrupt) else None  # Ctrl-C / SIGTERM: record, then stop
            status, completed = "error", False
            node = ev.current
            ev.emit("execution_interrupted", {"node_id": node, "node_type": job.classes.get(node),
                                              "executed": list(ev.executed), "timestamp": now_ms()},
                    record=True)
        except Exception as e:  # a failing prompt is reported; the server carries on
            ev.flush_cached()
            status, completed = "error", False
            node = ev.cid(e.node_id) if isinstance(e, NodeFailed) else ev.current
            cause = e.cause if isinstance(e, NodeFailed) else e
            ev.emit("execution_error", {
                "node_id": node, "node_type": job.classes.get(node), "executed": list(ev.executed),
                "exception_message": str(e), "exception_type": type(cause).__name__, "traceback": [],
                "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}, record=True)
        finally:
            self.executor.events = RunEvents()
        record = self._record(job, ev, status, completed)
        if stopping is not None:
            self.queue.finish(job, record)
            raise stopping
        return record

    def _record(self, job: Job, ev: _JobEvents, status: str, completed: bool) -> dict:
        meta = {cid: {"node_id": cid, "display_node": cid, "parent_node": None, "real_node_id": cid}
                for cid in ev.outputs}
        return {"prompt": job.entry(), "outputs": ev.outputs,
                "status": {"status_str": status, "completed": completed, "messages": ev.messages},
                "meta": meta}


def image_ref(folders: dict[str, Path]) -> Callable[[str, str], dict | None]:
    """ComfyUI's {"filename", "subfolder", "type"} for a file in one of the served folders."""
    roots = {kind: Path(p).resolve() for kind, p in folders.items()}

    def ref(path: str, kind: str) -> dict | None:
        root = roots.get(kind)
        p = Path(path).resolve()
        if root is None or root not in p.parents:
            return None
        sub = "" if p.parent == root else p.parent.relative_to(root).as_posix()
        return {"filename": p.name, "subfolder": sub, "type": kind}

    return ref

