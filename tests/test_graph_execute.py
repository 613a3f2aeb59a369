"""Planning and cached execution with toy nodes: what runs, in which order, and what comes from cache."""

from __future__ import annotations

import os

import pytest
from graph_helpers import Runner, executions, statuses, write

from graph import FLOAT, Float, node
from graph.errors import NodeFailed
from graph.executor import DISK, MEMORY, NOT_NEEDED, RAN, RunEvents

ENCODE = """
params: {pos: a castle, neg: blurry, seed: 1}
nodes:
  model: {type: LoadToyModel}
  pos:   {type: Encode, model: {from: model.TOYMODEL}, text: $pos}
  neg:   {type: Encode, model: {from: model.TOYMODEL}, text: $neg}
  total: {type: SumVec, v: {from: pos.TOYVEC}, extra: {from: neg.TOYVEC}, seed: $seed}
  save:  {type: WriteNumber, x: {from: total.TOTAL}, prefix: $$out}
  spare: {type: Const, value: 3}
"""


@pytest.fixture(autouse=True)
def clear_executions():
    executions().clear()


def ran(since: int = 0) -> list[str]:
    return executions()[since:]


def test_topological_order_and_only_needed_nodes(tmp_path):
    result = Runner(tmp_path).run(write(tmp_path, ENCODE))
    assert ran() == ["LoadToyModel", "Encode", "Encode", "SumVec", "WriteNumber"]
    assert [r.id for r in result.nodes] == ["model", "pos", "neg", "total", "save", "spare"]
    assert statuses(result)["spare"] == NOT_NEEDED and result.nodes[-1].type == "Const"
    out = tmp_path / "output" / "$out.txt"  # $$ escapes a literal $
    assert out.read_text() == repr(len("a castle") * 2.0 + len("blurry") * 2.0 + 1)
    assert result.files == [str(out.resolve())]


def test_identical_rerun_executes_nothing_in_process_and_across_processes(tmp_path):
    path = write(tmp_path, ENCODE)
    runner = Runner(tmp_path)
    runner.run(path)
    n = len(ran())
    again = runner.run(path)
    assert ran(n) == []
    assert statuses(again)["save"] == MEMORY
    assert {statuses(again)[k] for k in ("model", "pos", "neg", "total")} == {NOT_NEEDED}
    fresh = Runner(tmp_path).run(path)  # a new process: empty memory, same disk store
    assert ran(n) == []
    assert statuses(fresh)["save"] == DISK
    assert fresh.files == again.files


def test_seed_change_does_not_load_the_model_or_encode(tmp_path):
    path = write(tmp_path, ENCODE)
    Runner(tmp_path).run(path)
    path.write_text(ENCODE.replace("seed: 1}", "seed: 2}"))
    n = len(ran())
    result = Runner(tmp_path).run(path)  # new process: the encodings come from disk
    assert ran(n) == ["SumVec", "WriteNumber"]
    st = statuses(result)
    assert (st["pos"], st["neg"], st["model"]) == (DISK, DISK, NOT_NEEDED)


def test_prompt_change_reencodes_only_that_prompt(tmp_path):
    path = write(tmp_path, ENCODE)
    runner = Runner(tmp_path)
    runner.run(path)
    path.write_text(ENCODE.replace("a castle", "a tower"))
    n = len(ran())
    result = runner.run(path)
    assert ran(n) == ["Encode", "SumVec", "WriteNumber"]
    st = statuses(result)
    assert (st["model"], st["pos"], st["neg"]) == (MEMORY, RAN, MEMORY)


def test_cache_keys_do_not_depend_on_node_ids(tmp_path):
    runner = Runner(tmp_path)
    runner.run(write(tmp_path, ENCODE))
    renamed = ENCODE
    for old, new in [("model", "m"), ("pos", "p1"), ("neg", "n1"), ("total", "t"), ("save", "s")]:
        renamed = renamed.replace(f"  {old}:", f"  {new}:").replace(f"from: {old}.", f"from: {new}.")
    assert "from: m.TOYMODEL" in renamed
    n = len(ran())
    result = runner.run(write(tmp_path, renamed, "renamed.yaml"))
    assert ran(n) == []
    assert statuses(result)["s"] == MEMORY


def test_default_written_or_omitted_gives_the_same_key(tmp_path):
    tail = "  s: {type: SumVec, v: {from: v.TOYVEC}}\n  w: {type: WriteNumber, x: {from: s.TOTAL}}\n"
    runner = Runner(tmp_path)
    runner.run(write(tmp_path, "nodes:\n  v: {type: MakeVec}\n" + tail))
    n = len(ran())
    runner.run(write(tmp_path, "nodes:\n  v: {type: MakeVec, n: 4}\n" + tail, "b.yaml"))
    assert ran(n) == []


def test_several_outputs_by_name_and_index(tmp_path):
    path = write(tmp_path, """
        nodes:
          sp: {type: Split, text: abc}
          up: {type: WriteText, text: {from: sp.UPPER}, prefix: up}
          vec: {type: MakeVec, n: {from: sp.0}, fill: 0.5}
          sum: {type: SumVec, v: {from: vec.TOYVEC}}
          num: {type: WriteNumber, x: {from: sum.TOTAL}}
        """)
    Runner(tmp_path).run(path)
    assert (tmp_path / "output" / "up_00001.txt").read_text() == "ABC"
    assert (tmp_path / "output" / "num.txt").read_text() == "1.5"  # a literal input fed by a link


class Warnings(RunEvents):
    def __init__(self):
        self.messages = []

    def warning(self, message):
        self.messages.append(message)


def test_corrupt_disk_entry_is_recomputed_and_rewritten(tmp_path):
    path = write(tmp_path, ENCODE)
    Runner(tmp_path).run(path)
    objects = sorted((tmp_path / "cache" / "objects").rglob("*"))
    entries = [p for p in objects if p.is_file()]
    assert len(entries) == 4  # pos, neg, total, save (spare is not needed; the model is memory-only)
    for p in entries:
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        p.write_bytes(bytes(data))
    runner = Runner(tmp_path)
    events = Warnings()
    runner.executor.events = events
    n = len(ran())
    result = runner.run(path)
    assert ran(n) == ["LoadToyModel", "Encode", "Encode", "SumVec", "WriteNumber"]
    assert statuses(result)["save"] == RAN
    assert any("corrupt" in m and "'save'" in m for m in events.messages)
    again = Runner(tmp_path).run(path)  # the entry was rewritten and verifies now
    assert statuses(again)["save"] == DISK


def test_truncated_entries_everywhere_recompute_everything_needed(tmp_path):
    path = write(tmp_path, ENCODE)
    Runner(tmp_path).run(path)
    for p in (tmp_path / "cache" / "objects").rglob("*"):
        if p.is_file():
            p.write_bytes(p.read_bytes()[:20])
    n = len(ran())
    Runner(tmp_path).run(path)
    assert ran(n) == ["LoadToyModel", "Encode", "Encode", "SumVec", "WriteNumber"]


def test_changed_or_touched_input_file_invalidates(tmp_path):
    (tmp_path / "input").mkdir()
    src = tmp_path / "input" / "prompt.txt"
    src.write_text("hello")
    path = write(tmp_path, """
        nodes:
          r: {type: ReadText, name: prompt.txt}
          c: {type: Concat, a: {from: r.STRING}, b: world}
          w: {type: WriteText, text: {from: c.STRING}}
        """)
    Runner(tmp_path).run(path)
    n = len(ran())
    Runner(tmp_path).run(path)
    assert ran(n) == []
    src.write_text("HELLO")  # same size, new content
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Runner(tmp_path).run(path)
    assert ran(n) == ["ReadText", "Concat", "WriteText"]
    assert (tmp_path / "output" / "out_00002.txt").read_text() == "HELLO world"
    n = len(ran())
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # touched only
    Runner(tmp_path).run(path)
    assert ran(n) == ["ReadText", "Concat", "WriteText"]


def test_deleted_output_file_reruns_only_the_output_node(tmp_path):
    path = write(tmp_path, ENCODE)
    runner = Runner(tmp_path)
    first = runner.run(path)
    os.unlink(first.files[0])
    n = len(ran())
    result = runner.run(path)
    assert ran(n) == ["WriteNumber"]
    assert statuses(result)["total"] == MEMORY
    assert os.path.exists(result.files[0])


def test_failure_names_the_node_and_leaves_no_files(tmp_path):
    path = write(tmp_path, """
        nodes:
          c: {type: Const, value: 2}
          w: {type: WriteNumber, x: {from: c.FLOAT}}
          slow: {type: Slow, x: {from: c.FLOAT}, steps: 5, fail_at: 3}
        """)
    with pytest.raises(NodeFailed) as info:
        Runner(tmp_path).run(path)
    assert str(info.value).startswith("node 'slow' (Slow) failed: RuntimeError: boom at step 3")
    assert "WriteNumber" in ran()  # it ran and wrote num.txt, which the failure removed
    assert list((tmp_path / "output").iterdir()) == []


def test_wrong_number_of_returned_values_is_a_node_failure(tmp_path):
    @node(name="BadPair", outputs=(FLOAT, FLOAT))
    def bad_pair(x: Float() = 1.0):
        return x

    path = write(tmp_path, """
        nodes:
          b: {type: BadPair}
          w: {type: WriteNumber, x: {from: b.1}}
        """)
    with pytest.raises(NodeFailed, match=r"node 'b' \(BadPair\) failed: .*declares 2 outputs"):
        Runner(tmp_path).run(path)


def test_volatile_and_never_cached_nodes_rerun(tmp_path):
    calls = []

    @node(name="Clock", outputs=(FLOAT,), volatile=True)
    def clock():
        calls.append("Clock")
        return float(len(calls))

    @node(name="Twice", outputs=(FLOAT,), cache="never")
    def twice(x: Float() = 1.0):
        calls.append("Twice")
        return 2 * x

    path = write(tmp_path, """
        nodes:
          c: {type: Clock}
          t: {type: Twice, x: 3}
          a: {type: Add, a: {from: c.FLOAT}, b: 0}
          w: {type: WriteNumber, x: {from: a.FLOAT}}
          w2: {type: WriteNumber, x: {from: t.FLOAT}, prefix: t}
        """)
    runner = Runner(tmp_path)
    runner.run(path)
    runner.run(path)
    assert calls.count("Clock") == 2  # volatile: its consumers never hit either
    assert ran().count("Add") == 2
    assert calls.count("Twice") == 1  # not stored, but its consumer (w2) was a cache hit


def test_an_error_after_cancellation_is_a_cancellation(tmp_path):
    from graph.errors import Cancelled

    class ModelCodeCancelled(Exception):
        pass

    @node(name="Polls", output=True)
    def polls(x: Float() = 1.0, ctx=None):
        with ctx.output_file(ctx.output_dir / "polled.txt") as tmp:
            tmp.write_text("done")
        ctx.cancel_event.set()  # as Executor.cancel() would, from another thread
        if ctx.is_cancelled():
            raise ModelCodeCancelled()

    path = write(tmp_path, "nodes:\n  p: {type: Polls}\n")
    with pytest.raises(Cancelled):
        Runner(tmp_path).run(path)
    assert list((tmp_path / "output").iterdir()) == []


def test_ctx_offers_fingerprints(tmp_path):
    seen = {}

    @node(name="Derive", output=True)
    def derive(name: str = "w.bin", ctx=None):
        src = ctx.models_dir / name
        seen["fp"] = ctx.fingerprint(src)

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.bin").write_bytes(b"weights")
    Runner(tmp_path).run(write(tmp_path, "nodes:\n  d: {type: Derive}\n"))
    assert seen["fp"].startswith("7:")
