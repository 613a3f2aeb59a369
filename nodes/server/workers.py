"""`sdgraph serve --workers N`: N executor processes behind the one queue. Each process sets up the runtime,
loads the nodes and keeps its own in-process caches (the disk cache is shared; sinks never overwrite one
another's files), and runs the prompts a dispatcher thread of the server hands it, sending the engine's
messages back over a pipe. An interrupt reaches a process through its own cancel event."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from graph.context import Folders
from nodes.server.queue import PromptQueue, Send, Worker, image_ref, now_ms


def _child(conn, cancel, folders: tuple[str, str, str], dirs: dict, cache_dir, no_cache: bool) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops its workers
    from graph.disk_cache import default_cache_dir
    from sd import runtime

    runtime.setup(cache_dir or default_cache_dir())  # before MLX is imported, as the CLI does
    import nodes  # noqa: F401  (registers the nodes)
    from graph.runner import open_executor
    from nodes.server.prompts import PromptRejected, prepare_prompt

    folders_ = Folders(*map(Path, folders))
    with open_executor(cache_dir, no_cache, folders_) as executor:
        executor.cancel_event = cancel  # a multiprocessing.Event: the parent sets it, the nodes poll it
        worker = Worker(PromptQueue(), executor, lambda e, d, sid: conn.send(("event", e, d, sid)),
                        image_ref(dirs))
        while (msg := conn.recv()) is not None:
            prompt, prompt_id, number, extra = msg
            try:
                job = prepare_prompt(prompt, folders_, number, prompt_id, extra)
            except PromptRejected as e:  # validated by the parent already; a file may have gone since
                conn.send(("done", _failed(prompt_id, [number, prompt_id, prompt, extra, []], str(e))))
                continue
            try:
                record = worker.run_job(job)
            except KeyboardInterrupt:
                break
            conn.send(("done", record))


def _failed(prompt_id: str, entry: list, message: str) -> dict:
    data = {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
            "exception_message": message, "exception_type": "WorkerError", "traceback": [],
            "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}
    return {"prompt": entry, "outputs": {}, "status": {"status_str": "error", "completed": False,
                                                        "messages": [["execution_error", data]]}, "meta": {}}


class WorkerPool:
    """The parent's side: one process and one dispatcher thread per worker."""

    def __init__(self, n: int, queue: PromptQueue, send: Send, folders: Folders, dirs: dict[str, Path],
                 cache_dir, no_cache: bool):
        self.queue, self.send = queue, send
        self.args = ((str(folders.models_dir), str(folders.input_dir), str(folders.output_dir)),
                     {k: str(v) for k, v in dirs.items()}, cache_dir, no_cache)
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process holding MLX and threads
        self.slots = [self._spawn() for _ in range(n)]
        self.assigned: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._dispatch, args=(i,), daemon=True,
                                         name=f"sdgraph-serve-dispatch-{i}") for i in range(n)]

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        cancel = self.ctx.Event()
        proc = self.ctx.Process(target=_child, args=(child, cancel, *self.args), daemon=True)
        proc.start()
        child.close()
        return [proc, parent, cancel]

    def send_status(self) -> None:
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}}, None)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        targets = [prompt_id] if prompt_id else list(self.assigned)
        hit = False
        for pid in targets:
            if pid in self.assigned:
                self.slots[self.assigned[pid]][2].set()
                hit = True
        return hit

    def _dispatch(self, i: int) -> None:
        while (job := self.queue.take()) is not None:
            proc, conn, cancel = self.slots[i]
            cancel.clear()
            self.assigned[job.prompt_id] = i
            try:
                conn.send((job.prompt, job.prompt_id, job.number, job.extra_data))
                while True:
                    kind, *rest = conn.recv()
                    if kind == "event":
                        self.send(*rest)
                    else:
                        record = rest[0]
                        break
            except (EOFError, OSError) as e:  # the process died: report it, start another
                record = _failed(job.prompt_id, job.entry(), f"worker process {i} ended ({e!r})")
                self.send("execution_error", record["status"]["messages"][0][1], job.client_id)
                proc.kill()
                self.slots[i] = self._spawn()
            finally:
                self.assigned.pop(job.prompt_id, None)
            self.queue.finish(job, record)
            self.send("executing", {"node": None, "display_node": None, "prompt_id": job.prompt_id},
                      job.client_id)
            self.send_status()

    def run(self) -> None:
        """Dispatch until interrupted; then stop the processes."""
        for t in self.threads:
            t.start()
        try:
            for t in self.threads:
                while t.is_alive():
                    t.join(0.5)
        finally:
            self.queue.close()
            for _, conn, cancel in self.slots:
                cancel.set()
                try:
                    conn.send(None)
                except OSError:
                    pass
            for proc, _, _ in self.slots:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
