"""The model store (sd/loading/store.py): a byte budget over the arrays entries hold, shared arrays counted
once, least recently used out, dependents (accelerated wrappers) leaving with their model; the budget's
size spellings; and the one file identity (the engine's fingerprint) the nodes' store keys by."""

from __future__ import annotations

import os
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from sd_nodes_testing import make_world

from nodes import models
from nodes.values import FileRef, ModelRecipe
from sd.loading.store import ENV_BUDGET, ModelStore, arrays_in, default_budget, parse_size

KB = 1024


def block(n_bytes: int = KB) -> mx.array:
    a = mx.zeros((n_bytes // 4,), dtype=mx.float32)
    mx.eval(a)
    return a


class Wrapper:
    """Stands in for an accelerated wrapper: holds its module and may grow weights of its own later."""

    def __init__(self, module):
        self.module = module
        self.extra: dict = {}


@pytest.mark.parametrize("text, expected", [
    ("123", 123), ("8G", 8 << 30), ("8g", 8 << 30), ("8GB", 8 << 30), ("8GiB", 8 << 30), ("512M", 512 << 20),
    ("1.5G", 3 << 29), ("64k", 64 << 10), (" 2T ", 2 << 40), ("0", 0)])
def test_sizes_are_read_in_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "8 gigs", "-1", "1.5", "G", "8X", "8GG", "1e9", "eight"])
def test_other_spellings_are_refused_naming_the_variable(text):
    with pytest.raises(ValueError, match=f"{ENV_BUDGET}=.* is not a size.*8G, 512M"):
        parse_size(text)


def test_the_default_budget_comes_from_the_machine_or_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_BUDGET, raising=False)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < default_budget() <= physical // 2
    monkeypatch.setenv(ENV_BUDGET, "512M")
    assert default_budget() == 512 << 20 and ModelStore().budget == 512 << 20
    monkeypatch.setenv(ENV_BUDGET, "lots")
    store = ModelStore()  # read on first use, so a bad value fails where a model is stored, saying why
    with pytest.raises(ValueError, match=ENV_BUDGET):
        store.get("k", lambda: 1)


def test_entries_past_the_budget_go_least_recently_used_first():
    store = ModelStore(budget=3 * KB)
    for key in "abc":
        store.get(key, lambda: {"w": block()})
    assert store.total_bytes == 3 * KB
    store.get("a")  # a is now the most recently used: b goes first
    store.get("d", lambda: {"w": block()})
    assert list(store.keys()) == ["c", "a", "d"] and store.total_bytes == 3 * KB
    built = []
    store.get("b", lambda: built.append(1) or {"w": block()})  # gone: built again
    assert built == [1] and list(store.keys()) == ["a", "d", "b"]
    store.budget = KB  # a smaller budget applies at once
    assert list(store.keys()) == ["b"]


def test_a_value_bigger_than_the_budget_is_returned_and_not_kept():
    store = ModelStore(budget=2 * KB)
    store.get("small", lambda: {"w": block()})
    big = store.get("big", lambda: {"w": block(4 * KB)})
    assert big["w"].nbytes == 4 * KB and "big" not in store and "small" in store


def test_arrays_shared_between_entries_are_counted_once():
    base = nn.Linear(64, 64)  # weight 16 KiB + bias
    mx.eval(base.parameters())
    patched = nn.Linear(64, 64)
    patched.bias = base.bias  # shares the bias, owns a new weight (as a LoRA-patched copy does)
    store = ModelStore(budget=1 << 20)
    store.put("base", base)
    store.put("patched", patched)
    weight, bias = base.weight.nbytes, base.bias.nbytes
    assert store.nbytes("base") == store.nbytes("patched") == weight + bias
    assert store.total_bytes == 2 * weight + bias
    store.discard("base")
    assert store.total_bytes == weight + bias  # the shared bias still counts: patched holds it


def test_numpy_arrays_and_attributes_are_found():
    holder = Wrapper({"a": np.zeros(256, np.float32)})
    holder.extra["b"] = [block(), (block(2 * KB),)]
    assert sorted(arrays_in(holder).values()) == [KB, KB, 2 * KB]


def test_an_accelerated_entry_leaves_with_its_model_and_may_leave_alone():
    store = ModelStore(budget=10 * KB)
    model = {"w": block(2 * KB)}
    store.put("unet", model)
    fast = store.get(("fast", "unet"), lambda: Wrapper(model), parent="unet")
    assert store.key_of(model) == "unet" and store.key_of(fast) == ("fast", "unet")
    assert store.total_bytes == 2 * KB  # the wrapper holds the model's arrays: not counted twice
    fast.extra["fused"] = block(3 * KB)  # built on first use, counted at the next addition
    store.put("other", {"w": block()})
    assert store.total_bytes == 6 * KB
    # under pressure the wrapper (older than its model: using it uses the model too) goes first, alone
    store.get("other")
    store.put("more", {"w": block(5 * KB)})  # 11 KiB: 1 over
    assert ("fast", "unet") not in store and "unet" in store
    # the model's eviction takes its wrapper with it
    store.put(("fast", "unet"), fast, parent="unet")
    store.discard("unet")
    assert ("fast", "unet") not in store and store.key_of(fast) is None
    # a wrapper of a model the store does not hold is not kept
    store.put(("fast", "gone"), Wrapper({}), parent="gone")
    assert ("fast", "gone") not in store


def test_unweighed_entries_cost_nothing():
    store = ModelStore(budget=KB)
    store.get("skeleton", lambda: {"w": mx.zeros((100_000,))}, weigh=False)  # never evaluated
    assert store.total_bytes == 0 and "skeleton" in store


# --- one identity per file: the engine's fingerprint, in FileRef and the store's keys -------------------

@pytest.fixture
def checkpoint(tmp_path_factory, tmp_path):
    world = make_world(tmp_path_factory, tmp_path)
    path = tmp_path / "model.safetensors"
    shutil.copyfile(world.checkpoint, path)
    return path


@pytest.mark.slow
def test_the_same_file_has_one_identity_and_a_changed_one_a_new_one(checkpoint):
    from graph.fingerprint import FingerprintIndex

    first = FileRef.of(checkpoint)
    assert FileRef.of(checkpoint) == first
    assert first.identity == FingerprintIndex().fingerprint(checkpoint)  # the engine's, as the cache key's
    st = checkpoint.stat()
    os.utime(checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = FileRef.of(checkpoint)
    assert touched.identity != first.identity
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 1  # same size, same mtime, other content
    checkpoint.write_bytes(bytes(data))
    os.utime(checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert FileRef.of(checkpoint).identity != touched.identity


@pytest.mark.slow
def test_the_store_keys_weights_by_file_identity_and_counts_shared_arrays_once(checkpoint, tmp_path_factory,
                                                                                tmp_path):
    models.clear()
    models.LOAD_COUNTS.clear()
    ref = FileRef.of(checkpoint)
    base = models.unet_for(ModelRecipe(ref))
    assert models.unet_for(ModelRecipe(FileRef.of(checkpoint))) is base and models.LOAD_COUNTS["unet"] == 1
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(checkpoint, copy)
    os.utime(copy, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns))
    assert models.unet_for(ModelRecipe(FileRef.of(copy))) is base  # same content, size and mtime: same key

    world = make_world(tmp_path_factory, tmp_path)
    lora = FileRef.of(world.models / "loras" / "detail.safetensors")
    patched = models.unet_for(ModelRecipe(ref).with_lora(lora, 0.5))
    store = models.STORE
    key, patched_key = store.key_of(base), store.key_of(patched)
    assert key == ("unet", ref.identity)
    assert patched_key == ("unet", ref.identity, ((lora.identity, 0.5, False),))
    assert store.nbytes(key) < store.total_bytes < store.nbytes(key) + store.nbytes(patched_key)
    # a strength change reuses the LoRA's deltas (a store entry, counted), not the patched weights
    [deltas_key] = [k for k in store.keys() if k[0] == "deltas"]
    assert deltas_key[1:] == (lora.identity, "unet", False, key) and store.nbytes(deltas_key) > 0
    other = models.unet_for(ModelRecipe(ref).with_lora(lora, -1.0))
    assert other is not patched and [k for k in store.keys() if k[0] == "deltas"] == [deltas_key]
    fast = models.fast_unet(patched)
    assert store.key_of(fast) == ("fast", patched_key) and not hasattr(patched, "_sdgraph_fast_unet")

    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    assert models.unet_for(ModelRecipe(FileRef.of(checkpoint))) is not base  # touched: a new identity
    assert models.LOAD_COUNTS["unet"] == 2
    models.clear()
    assert len(store) == 0
