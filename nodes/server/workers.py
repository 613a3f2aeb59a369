"""`sdgraph serve --workers N`: N executor processes behind the one queue. Each process sets up the runtime,
loads the nodes (with the CLI's entry, SDGRAPH_EXTRA_NODES too) and keeps its own in-process caches (the disk
cache is shared; sinks never overwrite one another's files), and runs the prompts a dispatcher thread of the
server hands it, sending the engine's messages back over a pipe. An interrupt reaches a process through its
own cancel event. With a GPU per worker (MLX on CUDA, at least N GPUs) worker i sees only GPU i, as
`--distributed` pins the ranks of a host; otherwise the workers share the device, and the server says so."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

from graph.context import Folders
from graph.distributed.world import nvidia_gpu_count
from nodes.server.queue import PromptQueue, Send, Worker, image_ref, now_ms


def _child(conn, cancel, folders: tuple[str, str, str], dirs: dict, cache_dir, no_cache: bool) -> None:
    """A worker process's entry for a server not started by the CLI. Unpickling it imported this package and
    with it MLX, so the runtime's BLAS comes too late here; the CLI's entry (cli.py) sets it up first."""
    from graph.disk_cache import default_cache_dir
    from sd import runtime

    runtime.setup(cache_dir or default_cache_dir())
    import nodes  # noqa: F401  (registers the nodes)

    serve_prompts(conn, cancel, folders, dirs, cache_dir, no_cache)


def serve_prompts(conn, cancel, folders: tuple[str, str, str], dirs: dict, cache_dir, no_cache: bool) -> None:
    """A worker process's loop (the runtime set up, the nodes registered): run each prompt the parent sends
    through this process's executor, sending the engine's messages and then the history record back."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops its workers
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
                record = _failed(prompt_id, [number, prompt_id, prompt, extra, []], str(e))
                conn.send(("event", "execution_error", record["status"]["messages"][0][1],
                           extra.get("client_id")))  # its client waits for an end message
                conn.send(("done", record))
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


def current_device() -> str:
    """'cuda', 'metal' or 'cpu': where this process's MLX runs."""
    import mlx.core as mx

    return "cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "cpu"


def gpu_plan(n: int, device: str, gpus: int, visible: str | None) -> tuple[list[dict[str, str]], str | None]:
    """What each of `n` workers adds to its environment, and what to tell the user (None when nothing).

    On CUDA with at least n GPUs worker i gets CUDA_VISIBLE_DEVICES=i (the i-th of the devices an existing
    CUDA_VISIBLE_DEVICES, `visible`, lists; `gpus` counts the host's otherwise). Fewer GPUs, a Mac or the
    CPU: every worker sees the one device, and the note says they share it."""
    if n < 2:
        return [{} for _ in range(n)], None
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else \
        [str(i) for i in range(gpus)]
    if device == "cuda" and len(ids) >= n:
        return [{"CUDA_VISIBLE_DEVICES": ids[i]} for i in range(n)], None
    if device == "cuda":
        shared = f"{len(ids)} GPU{'' if len(ids) == 1 else 's'}"
    else:
        shared = "this Mac's GPU" if device == "metal" else "this machine's CPU"
    note = (f"sdgraph serve: the {n} workers share {shared} (one process per GPU needs {n} GPUs on CUDA): "
            "prompts run side by side, each more slowly")
    return [{} for _ in range(n)], note


_SPAWN_ENV = threading.Lock()   # a worker started again from a dispatcher thread: one environment at a time


def start_with_env(proc, env: dict[str, str]) -> None:
    """Start `proc` (spawned: a new interpreter inheriting os.environ as it is now) with `env` added, so
    CUDA_VISIBLE_DEVICES is set before the child imports MLX; this process's environment is put back."""
    with _SPAWN_ENV:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class WorkerPool:
    """The parent's side: one process and one dispatcher thread per worker."""

    def __init__(self, n: int, queue: PromptQueue, send: Send, folders: Folders, dirs: dict[str, Path],
                 cache_dir, no_cache: bool, device: str | None = None, gpus: int | None = None,
                 entry=None):
        self.queue, self.send = queue, send
        self.entry = entry or _child  # what each process runs: (conn, cancel, *self.args)
        self.args = ((str(folders.models_dir), str(folders.input_dir), str(folders.output_dir)),
                     {k: str(v) for k, v in dirs.items()}, cache_dir, no_cache)
        self.envs, self.note = gpu_plan(n, device or current_device(),
                                        nvidia_gpu_count() if gpus is None else gpus,
                                        os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process holding MLX and threads
        self.slots = [self._spawn(i) for i in range(n)]
        self.assigned: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._dispatch, args=(i,), daemon=True,
                                         name=f"sdgraph-serve-dispatch-{i}") for i in range(n)]

    def _spawn(self, i: int):
        parent, child = self.ctx.Pipe()
        cancel = self.ctx.Event()
        proc = self.ctx.Process(target=self.entry, args=(child, cancel, *self.args), daemon=True)
        start_with_env(proc, self.envs[i])
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
                self.slots[i] = self._spawn(i)
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
