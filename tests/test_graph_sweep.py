"""Overrides and sweeps: parsing by the target's type, deterministic variations with stable ids."""

from __future__ import annotations

import pytest
from graph_helpers import write

from graph.errors import ValidationFailed
from graph.importers import load_workflow
from graph.runner import prepare
from graph.sweep import apply_overrides, make_variations, parse_sweep
from graph.workflow import ParamRef

WF = """
params: {seed: 1, word: hi}
nodes:
  v: {type: MakeVec, n: 2, fill: 1.0}
  s: {type: SumVec, v: {from: v.TOYVEC}, seed: $seed}
  c: {type: Concat, a: $word, b: there}
  w: {type: WriteNumber, x: {from: s.TOTAL}}
  t: {type: WriteText, text: {from: c.STRING}}
"""


def test_variations_are_a_deterministic_cartesian_product():
    sweeps = [("s.seed", ["1", "2"]), ("word", ["a", "b", "c"])]
    vs = make_variations([("v.n", "3")], sweeps)
    assert [v.overrides for v in vs[:3]] == [
        {"v.n": "3", "s.seed": "1", "word": "a"},
        {"v.n": "3", "s.seed": "1", "word": "b"},
        {"v.n": "3", "s.seed": "1", "word": "c"},
    ]
    assert len(vs) == 6 and [v.index for v in vs] == list(range(6))
    assert [v.id for v in vs] == [v.id for v in make_variations([("v.n", "3")], sweeps)]
    assert len({v.id for v in vs}) == 6
    assert make_variations([], []) and make_variations([], [])[0].overrides == {}


def test_sweep_values_from_a_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("a castle, at dusk\n\na tower\n")
    assert parse_sweep("c.a=@prompts.txt", tmp_path) == ("c.a", ["a castle, at dusk", "a tower"])
    assert parse_sweep("s.seed=1,2,3") == ("s.seed", ["1", "2", "3"])
    assert parse_sweep("s.seed=2,1,2") == ("s.seed", ["2", "1"])
    with pytest.raises(ValidationFailed, match="cannot read"):
        parse_sweep("c.a=@missing.txt", tmp_path)


def test_overrides_are_parsed_by_the_target_type(tmp_path):
    wf = load_workflow(write(tmp_path, WF))
    out, parsed = apply_overrides(wf, {"v.fill": "2", "seed": "7", "c.b": "007", "word": "42"})
    assert parsed == {"v.fill": 2.0, "seed": 7, "c.b": "007", "word": "42"}
    assert out.nodes["v"].inputs["fill"] == 2.0 and out.params["seed"] == 7
    assert out.nodes["s"].inputs["seed"] == ParamRef("seed")
    assert wf.params["seed"] == 1 and wf.nodes["v"].inputs["fill"] == 1.0  # the original is untouched


def test_bad_overrides_are_all_reported(tmp_path):
    wf = load_workflow(write(tmp_path, WF))
    with pytest.raises(ValidationFailed) as info:
        apply_overrides(wf, {"v.n": "5000", "v.fil": "1", "sead": "1", "q.n": "1", "s.v": "x", "v.n2": "1"})
    text = str(info.value)
    assert "override v.n='5000': 5000 is above the maximum 1000" in text
    assert "did you mean 'fill'" in text and "did you mean 'seed'" in text
    assert "no node 'q'" in text and "is a TOYVEC link" in text
    assert len(info.value.problems) == 6


def test_override_text_that_is_not_yaml(tmp_path):
    wf = load_workflow(write(tmp_path, WF))
    out, parsed = apply_overrides(wf, {"word": "[not yaml", "c.b": "{x"})  # strings: taken verbatim
    assert parsed == {"word": "[not yaml", "c.b": "{x"}
    with pytest.raises(ValidationFailed) as info:  # a number cannot be read from it: an error, located
        apply_overrides(wf, {"v.fill": "[1", "seed": "[1"})
    assert [(p.node, p.input) for p in info.value.problems] == [("v", "fill"), ("s", "seed")]
    assert "cannot read '[1' as a value" in str(info.value)


def test_prepare_validates_every_variation_before_running(tmp_path):
    wf = load_workflow(write(tmp_path, WF))
    prepared = prepare(wf, [("word", "yo")], [("s.seed", ["1", "2"])], None)
    assert [p.overrides for p in prepared] == [{"word": "yo", "s.seed": 1}, {"word": "yo", "s.seed": 2}]
    info = prepared[1].run_info()
    assert info["overrides"] == {"word": "yo", "s.seed": 2}
    assert info["workflow"]["nodes"]["s"]["seed"] == 2 and info["workflow"]["params"]["word"] == "yo"
    with pytest.raises(ValidationFailed, match="is below the minimum 1"):
        prepare(wf, [], [("v.n", ["2", "0"])], None)
