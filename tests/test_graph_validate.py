"""A corpus of broken workflows: each problem names the right file, line, node and input."""

from __future__ import annotations

import pytest
from graph_helpers import problems_of, write

from graph.context import Folders

GOOD_TAIL = """
  w:   {type: WriteNumber, x: {from: s.TOTAL}}
"""


def only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_valid_workflow_has_no_problems(tmp_path):
    path = write(tmp_path, """
        params: {n: 3}
        nodes:
          v: {type: MakeVec, n: $n}
          s: {type: SumVec, v: {from: v.TOYVEC}}
          w: {type: WriteNumber, x: {from: s.TOTAL}}
        """)
    assert problems_of(path) == []


CASES = [
    # (name, yaml body, expected line, node, input, words in the message)
    ("unknown type", """
        nodes:
          v: {type: MakeVec}
          s: {type: SumVek, v: {from: v.TOYVEC}}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "s", None, ["unknown node type 'SumVek'", "did you mean 'SumVec'"]),
    ("unknown input", """
        nodes:
          v:
            type: MakeVec
            fil: 2.0
          w: {type: WriteNumber, x: 1.0}
        """, 4, "v", "fil", ["unknown input 'fil'", "did you mean 'fill'"]),
    ("missing required", """
        nodes:
          s: {type: SumVec}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "s", "v", ["missing required input 'v'"]),
    ("wrong socket type", """
        nodes:
          c: {type: Const}
          s:
            type: SumVec
            v: {from: c.FLOAT}
          w: {type: WriteNumber, x: 1.0}
        """, 5, "s", "v", ["expects TOYVEC", "is FLOAT"]),
    ("above maximum", """
        nodes:
          v: {type: MakeVec,
              n: 1001}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "v", "n", ["1001 is above the maximum 1000"]),
    ("below minimum", """
        nodes:
          v: {type: MakeVec, n: 0}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "v", "n", ["0 is below the minimum 1"]),
    ("wrong literal type", """
        nodes:
          v: {type: MakeVec, n: "four"}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "v", "n", ["expected an integer"]),
    ("float for int", """
        nodes:
          v: {type: MakeVec, n: 2.5}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "v", "n", ["expected an integer, got 2.5"]),
    ("bad choice", """
        nodes:
          c: {type: Concat, a: x, sep: "+"}
          w: {type: WriteText, text: {from: c.STRING}}
        """, 2, "c", "sep", ["'+' is not one of"]),
    ("link to unknown node", """
        nodes:
          s: {type: SumVec, v: {from: vec.TOYVEC}}
          w: {type: WriteNumber, x: 1.0}
          vek: {type: MakeVec}
        """, 2, "s", "v", ["unknown node 'vec'", "did you mean 'vek'"]),
    ("link to unknown output", """
        nodes:
          v: {type: MakeVec}
          s: {type: SumVec, v: {from: v.VEC}}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "s", "v", ["has no output 'VEC'", "TOYVEC"]),
    ("link output index out of range", """
        nodes:
          v: {type: MakeVec}
          s: {type: SumVec, v: {from: v.1}}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "s", "v", ["has no output '1'"]),
    ("literal for a socket", """
        nodes:
          s: {type: SumVec, v: model.safetensors}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "s", "v", ["expects a link from a TOYVEC output", "'model.safetensors'"]),
    ("unknown param", """
        params: {count: 3}
        nodes:
          v: {type: MakeVec, n: $cuont}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "v", "n", ["unknown param '$cuont'", "did you mean 'count'"]),
    ("param value out of range", """
        params: {count: 5000}
        nodes:
          v: {type: MakeVec, n: $count}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "v", "n", ["5000 is above the maximum 1000"]),
    ("no output node", """
        nodes:
          v: {type: MakeVec}
        """, 1, None, None, ["no output node", "WriteNumber"]),
    ("duplicate id", """
        nodes:
          v: {type: MakeVec}
          w: {type: WriteNumber, x: 1.0}
          v: {type: MakeVec, n: 2}
        """, 4, "v", None, ["duplicate node id 'v'", "line 2"]),
    ("duplicate input", """
        nodes:
          v: {type: MakeVec, n: 1, n: 2}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "v", "n", ["duplicate key 'n'"]),
    ("link with extra keys", """
        nodes:
          v: {type: MakeVec}
          s: {type: SumVec, v: {from: v.TOYVEC, to: x}}
          w: {type: WriteNumber, x: 1.0}
        """, 3, "s", "v", ["must be a link like {from: node.OUTPUT}"]),
    ("dotted node id", """
        nodes:
          my.vec: {type: MakeVec}
          w: {type: WriteNumber, x: 1.0}
        """, 2, "my.vec", None, ["not a valid name"]),
]


@pytest.mark.parametrize("name,body,line,node,inp,words", CASES, ids=[c[0] for c in CASES])
def test_each_error_kind_is_located(tmp_path, name, body, line, node, inp, words):
    path = write(tmp_path, body)
    p = only(problems_of(path))
    assert (p.file, p.line, p.node, p.input) == (str(path), line, node, inp), str(p)
    for w in words:
        assert w in str(p)
    assert str(p).startswith(f"{path}:{line}: ")


def test_cycle_is_reported(tmp_path):
    path = write(tmp_path, """
        nodes:
          a: {type: Add, a: {from: b.FLOAT}}
          b: {type: Add, a: {from: a.FLOAT}}
          w: {type: WriteNumber, x: {from: b.FLOAT}}
        """)
    p = only(problems_of(path))
    assert "cycle" in p.message and "a -> b -> a" in p.message or "b -> a -> b" in p.message
    assert p.line in (2, 3)


def test_all_problems_are_collected(tmp_path):
    path = write(tmp_path, """
        nodes:
          v: {type: MakeVec, n: 0, fill: x}
          s: {type: SumVek}
          w: {type: WriteNumber}
        """)
    found = {(p.node, p.input) for p in problems_of(path)}
    assert found == {("v", "n"), ("v", "fill"), ("s", None), ("w", "x")}


def test_json_errors_have_lines_and_duplicates(tmp_path):
    path = write(tmp_path, """
        {
          "nodes": {
            "v": {"type": "MakeVec",
                  "n": 5000},
            "w": {"type": "WriteNumber", "x": 1.0},
            "w": {"type": "WriteNumber", "x": 2.0}
          }
        }
        """, "wf.json")
    p = only(problems_of(path))
    assert (p.line, p.node) == (6, "w") and "duplicate node id" in p.message
    fixed = path.read_text().replace('"w": {"type": "WriteNumber", "x": 2.0}', '"w2": {"type": "Const"}')
    path.write_text(fixed)
    p = only(problems_of(path))
    assert (p.line, p.node, p.input) == (4, "v", "n") and "above the maximum" in p.message


def test_syntax_errors_have_lines(tmp_path):
    path = write(tmp_path, "nodes:\n  v: {type: MakeVec\n  w: 1\n")
    p = only(problems_of(path))
    assert "YAML syntax error" in p.message and p.line is not None
    path = write(tmp_path, '{"nodes": {\n "v": {"type": "MakeVec",}}}', "wf.json")
    p = only(problems_of(path))
    assert "JSON syntax error" in p.message and p.line == 2


def test_missing_file_lists_what_is_available(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "hello.txt").write_text("hi")
    path = write(tmp_path, """
        nodes:
          r: {type: ReadText, name: helo.txt}
          w: {type: WriteText, text: {from: r.STRING}}
        """)
    p = only(problems_of(path, Folders(input_dir=tmp_path / "input")))
    assert (p.line, p.node, p.input) == (2, "r", "name")
    assert "hello.txt" in p.message


def test_dollar_escape_is_a_literal(tmp_path):
    path = write(tmp_path, """
        nodes:
          c: {type: Concat, a: $$HOME}
          w: {type: WriteText, text: {from: c.STRING}}
        """)
    assert problems_of(path) == []


def test_structure_messages_say_what_to_write(tmp_path):
    p = only(problems_of(write(tmp_path, "")))
    assert "mapping with a 'nodes:' section (the file is empty)" in p.message
    p = only(problems_of(write(tmp_path, "nodes: {}\n")))
    assert "needs at least one node" in p.message
    p = only(problems_of(write(tmp_path, "nodes:\n  w: {type: WriteNumber, x: {from: c}}\n")))
    assert (p.line, p.node, p.input) == (2, "w", "x") and "bad link {from: 'c'}" in p.message


def test_exponent_floats_are_numbers_in_yaml(tmp_path):
    path = write(tmp_path, """
        nodes:
          c: {type: Const, value: 1e2}
          w: {type: WriteNumber, x: {from: c.FLOAT}}
        """)
    assert problems_of(path) == []
