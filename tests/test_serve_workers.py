"""`sdgraph serve --workers N` and the GPUs: which device each worker process sees. With MLX on CUDA and at
least N GPUs worker i sees only GPU i (CUDA_VISIBLE_DEVICES, as `--distributed` pins the ranks of a host);
fewer GPUs, a Mac or the CPU: they share, with one note for the user. No GPU here: the GPU count is injected
and the processes are stand-ins that record the environment they would start with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graph.context import Folders
from nodes.server import workers
from nodes.server.queue import PromptQueue


def test_one_gpu_each_when_there_are_enough():
    envs, note = workers.gpu_plan(2, "cuda", gpus=2, visible=None)
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}] and note is None
    envs, note = workers.gpu_plan(3, "cuda", gpus=8, visible=None)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2"] and note is None
    # the user's CUDA_VISIBLE_DEVICES says which GPUs are ours: one of those each
    envs, note = workers.gpu_plan(2, "cuda", gpus=8, visible="5, 7")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["5", "7"] and note is None


@pytest.mark.parametrize("device, gpus, visible, shared", [
    ("cuda", 1, None, "1 GPU"), ("cuda", 8, "3", "1 GPU"), ("cuda", 0, "", "0 GPUs"),
    ("cpu", 0, None, "this machine's CPU"), ("cpu", 4, None, "this machine's CPU"),
    ("metal", 0, None, "this Mac's GPU")])
def test_workers_share_otherwise_and_say_so(device, gpus, visible, shared):
    envs, note = workers.gpu_plan(2, device, gpus=gpus, visible=visible)
    assert envs == [{}, {}]
    assert note.startswith(f"sdgraph serve: the 2 workers share {shared} ")


def test_a_single_worker_is_left_alone():
    assert workers.gpu_plan(1, "cuda", gpus=4, visible=None) == ([{}], None)


class _Recorder:
    """multiprocessing's spawn context, as far as WorkerPool uses it: each Process records the
    CUDA_VISIBLE_DEVICES a spawned interpreter would inherit when started."""

    def __init__(self):
        self.started: list[str | None] = []

    def Pipe(self):  # noqa: N802 (multiprocessing's name)
        class Conn:
            def close(self):
                pass
        return Conn(), Conn()

    def Event(self):  # noqa: N802
        return object()

    def Process(self, target, args, daemon):  # noqa: N802
        started = self.started

        class Proc:
            def start(self):
                started.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return Proc()


@pytest.mark.parametrize("gpus, expected, shares", [(2, ["0", "1"], False), (4, ["0", "1"], False),
                                                    (1, [None, None], True), (0, [None, None], True)])
def test_each_worker_process_starts_with_its_gpu(monkeypatch, tmp_path: Path, gpus, expected, shares):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    recorder = _Recorder()
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: recorder)
    folders = Folders(tmp_path / "models", tmp_path / "input", tmp_path / "output")
    pool = workers.WorkerPool(2, PromptQueue(), lambda *a: None, folders, {"output": tmp_path}, None, False,
                              device="cuda", gpus=gpus)
    assert recorder.started == expected
    assert (pool.note is not None) == shares
    pool._spawn(1)  # a worker that died is started again on its own GPU
    assert recorder.started[-1] == expected[1]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the server's own environment is put back


def test_the_environment_is_put_back_when_a_start_fails(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")

    class Failing:
        def start(self):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
            raise OSError("no more processes")

    with pytest.raises(OSError):
        workers.start_with_env(Failing(), {"CUDA_VISIBLE_DEVICES": "3"})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
