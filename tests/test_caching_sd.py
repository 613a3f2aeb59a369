"""Caching with the SD nodes, counting node executions and model loads, in one process and across
processes (the CLI in a fresh interpreter)."""

from __future__ import annotations

import os

import pytest
from sd_nodes_testing import SMALL, WORKFLOWS, make_world, reset_loads, run, run_in_new_process

from graph.context import Folders
from graph.disk_cache import DiskCache
from graph.executor import Caches, Executor
from graph.importers import load_workflow
from graph.runner import prepare, run_variation
from graph.sweep import parse_assignment
from nodes import models

TXT2IMG = WORKFLOWS / "txt2img.yaml"
ALL_NODES = {"ckpt", "positive", "negative", "latent", "sampler", "decode", "save"}


@pytest.fixture
def world(tmp_path_factory, tmp_path):
    return make_world(tmp_path_factory, tmp_path)


class Session:
    """One process's engine (shared caches), like `sdgraph run` with a sweep."""

    def __init__(self, world):
        self.world = world
        folders = Folders(world.models, world.input, world.output)
        self.folders = folders
        self.executor = Executor(Caches(world.cache, DiskCache(world.cache)), folders)

    def run(self, *sets: str) -> dict[str, str]:
        pairs = [parse_assignment(s) for s in [*SMALL[1::2], *sets]]
        [pv] = prepare(load_workflow(TXT2IMG), pairs, [], self.folders)
        result = run_variation(self.executor, pv)
        return {r.id: r.status for r in result.nodes}

    def key(self, node_id: str, *sets: str) -> str:
        from graph.plan import make_plan

        pairs = [parse_assignment(s) for s in [*SMALL[1::2], *sets]]
        [pv] = prepare(load_workflow(TXT2IMG), pairs, [], self.folders)
        return make_plan(pv.bound, self.executor.caches.fingerprints).nodes[node_id].key


def ran(statuses: dict[str, str]) -> set[str]:
    return {n for n, s in statuses.items() if s == "ran"}


@pytest.mark.slow
def test_in_one_process_only_what_changed_runs(world):
    reset_loads()
    s = Session(world)
    assert ran(s.run()) == ALL_NODES
    assert dict(models.LOAD_COUNTS) == {"unet": 1, "clip": 1, "vae": 1}

    assert ran(s.run()) == set()  # identical re-run: nothing executes
    assert len(world.pngs()) == 1

    statuses = s.run("prompt=a red bicycle")
    assert ran(statuses) == {"positive", "sampler", "decode", "save"}
    assert statuses["negative"] == statuses["ckpt"] == statuses["latent"] == "memory cache"

    reset_loads()  # as if the models had been evicted: a seed change must not bring back the encoder
    statuses = s.run("prompt=a red bicycle", "seed=99")
    assert ran(statuses) == {"sampler", "decode", "save"}
    assert models.LOAD_COUNTS["clip"] == 0 and models.LOAD_COUNTS["unet"] == 1
    assert len(world.pngs()) == 3


@pytest.mark.slow
def test_a_new_process_takes_encodings_from_disk_without_loading_the_text_encoder(world, tmp_path):
    first = run(world, TXT2IMG, *SMALL)
    assert first.rc == 0 and set(first.statuses().values()) == {"ran"}

    same, loads = run_in_new_process(world, TXT2IMG, *SMALL, tmp=tmp_path)
    assert same.rc == 0, same.err
    statuses = same.statuses()
    assert ran(statuses) == set() and statuses["save"] == "disk cache"  # identical: nothing executes
    assert loads == {}

    seed, loads = run_in_new_process(world, TXT2IMG, *SMALL, "--set", "seed=7", tmp=tmp_path)
    assert seed.rc == 0, seed.err
    statuses = seed.statuses()
    assert statuses["negative"] == statuses["positive"] == "disk cache"
    assert ran(statuses) == {"ckpt", "sampler", "decode", "save"}  # ckpt only resolves the file
    assert "clip" not in loads and loads == {"unet": 1, "vae": 1}

    prompt, loads = run_in_new_process(world, TXT2IMG, *SMALL, "--set", "prompt=a blue kite", tmp=tmp_path)
    statuses = prompt.statuses()
    assert statuses["negative"] == "disk cache" and statuses["positive"] == "ran"
    assert loads["clip"] == 1
    assert len(world.pngs()) == 3


@pytest.mark.slow
def test_a_touched_checkpoint_invalidates_everything_downstream(world, tmp_path):
    # a private copy: touching the shared checkpoint would disturb other tests' keys
    private = tmp_path / "models"
    (private / "checkpoints").mkdir(parents=True)
    ckpt = private / "checkpoints" / world.checkpoint.name
    ckpt.write_bytes(world.checkpoint.read_bytes())
    world.models = private
    assert run(world, TXT2IMG, *SMALL).rc == 0
    assert ran(run(world, TXT2IMG, *SMALL).statuses()) == set()
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reset_loads()
    again = run(world, TXT2IMG, *SMALL)
    assert ran(again.statuses()) == ALL_NODES - {"latent"}  # the empty latent does not read the file
    assert models.LOAD_COUNTS["unet"] == models.LOAD_COUNTS["clip"] == 1


@pytest.mark.slow
def test_a_corrupt_cache_entry_is_recomputed(world):
    s = Session(world)
    assert ran(s.run()) == ALL_NODES
    entry = world.cache / "objects" / s.key("negative")[:2] / s.key("negative")
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    s.executor.caches.memory = type(s.executor.caches.memory)()  # a new process: memory is empty
    reset_loads()
    statuses = s.run("seed=3")  # the sampler runs, so both encodings are read from disk
    assert statuses["positive"] == "disk cache" and statuses["negative"] == "ran"
    assert models.LOAD_COUNTS["clip"] == 1
    s.executor.caches.memory = type(s.executor.caches.memory)()
    assert s.run("seed=4")["negative"] == "disk cache"  # and rewritten whole
