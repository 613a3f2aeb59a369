"""Toy nodes for the graph engine's tests (no Stable Diffusion). Importable by path through
SDGRAPH_EXTRA_NODES, so subprocess CLI runs use them too.

Every execution is appended to the file named by SDGRAPH_TEST_LOG (one node type per line) and to
EXECUTIONS, so tests can count what ran across runs and across processes."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np

from graph import FLOAT, INT, STRING, Choice, Float, Int, String, node, socket_type

EXECUTIONS: list[str] = []


def _executed(name: str) -> None:
    EXECUTIONS.append(name)
    log = os.environ.get("SDGRAPH_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")


def _vec_to_bytes(v: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, v, allow_pickle=False)
    return buf.getvalue()


def _vec_from_bytes(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


VEC = socket_type("TOYVEC", to_bytes=_vec_to_bytes, from_bytes=_vec_from_bytes)
TOYMODEL = socket_type("TOYMODEL")  # no serializer: memory cache only, like MODEL


@node(category="toy", outputs=(FLOAT,))
def Const(value: Float(-1000.0, 1000.0) = 0.0):
    """A constant number."""
    _executed("Const")
    return value


@node(category="toy", outputs=(FLOAT,))
def Add(a: Float(), b: Float(-1000.0, 1000.0) = 1.0):
    """Add two numbers (`a` is usually linked)."""
    _executed("Add")
    return a + b


@node(category="toy", outputs=(STRING,))
def Concat(a: String(), b: String() = "", sep: Choice([" ", "-", ""]) = " "):
    """Join two strings."""
    _executed("Concat")
    return f"{a}{sep}{b}"


@node(category="toy", outputs=(VEC,))
def MakeVec(n: Int(1, 1000) = 4, fill: Float() = 1.0):
    """A vector of n copies of fill (disk-cacheable)."""
    _executed("MakeVec")
    return np.full((n,), fill, dtype=np.float32)


@node(category="toy", outputs=(TOYMODEL,))
def LoadToyModel(name: String() = "toy"):
    """Stands in for a model loader (memory cache only)."""
    _executed("LoadToyModel")
    return {"name": name, "scale": 2.0}


@node(category="toy", outputs=(VEC,))
def Encode(model: TOYMODEL, text: String()):
    """Stands in for a text encoder: needs the model."""
    _executed("Encode")
    return np.array([len(text) * model["scale"]], dtype=np.float32)


@node(category="toy", outputs=(FLOAT,), output_names=("TOTAL",))
def SumVec(v: VEC, extra: VEC = None, seed: Int(0, 2**64 - 1) = 0):
    """Sum a vector (plus an optional second one)."""
    _executed("SumVec")
    return float(v.sum() + (extra.sum() if extra is not None else 0) + seed)


@node(category="toy", outputs=(INT, STRING), output_names=("LENGTH", "UPPER"))
def Split(text: String()):
    """Two outputs: length and upper-case."""
    _executed("Split")
    return len(text), text.upper()


def resolve_input(name: str, folders) -> Path:
    path = Path(folders.input_dir) / name
    if not path.exists():
        available = ", ".join(sorted(p.name for p in Path(folders.input_dir).glob("*"))) or "none"
        raise FileNotFoundError(f"file '{name}' not found in {folders.input_dir} (available: {available})")
    return path


@node(category="toy", outputs=(STRING,), reads_files={"name": resolve_input})
def ReadText(name: String(), ctx=None):
    """Read a text file from the input folder."""
    _executed("ReadText")
    return (Path(ctx.input_dir) / name).read_text()


@node(category="toy", output=True)
def WriteText(text: String(), prefix: String() = "out", ctx=None):
    """Write text to output/<prefix>_NNNNN.txt (never overwriting)."""
    _executed("WriteText")
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 1
    while (out / f"{prefix}_{n:05}.txt").exists():
        n += 1
    with ctx.output_file(out / f"{prefix}_{n:05}.txt") as tmp:
        tmp.write_text(text)


@node(category="toy", output=True)
def WriteNumber(x: Float(), prefix: String() = "num", ctx=None):
    """Write a number to output/<prefix>.txt."""
    _executed("WriteNumber")
    with ctx.output_file(Path(ctx.output_dir) / f"{prefix}.txt") as tmp:
        tmp.write_text(repr(x))


@node(category="toy", output=True)
def Slow(x: Float(), steps: Int(1, 100) = 3, fail_at: Int(0, 100) = 0, ctx=None):
    """Reports progress; raises at step `fail_at` (0: never) after a partial write."""
    _executed("Slow")
    target = Path(ctx.output_dir) / "slow.txt"
    with ctx.output_file(target) as tmp:
        for step in range(1, steps + 1):
            tmp.write_text(f"partial {step}")
            ctx.progress(step, steps)
            if step == fail_at:
                raise RuntimeError(f"boom at step {step}")
            time.sleep(0.001)
        tmp.write_text(f"done {x}")


@node(category="toy", output=True, volatile=True)
def Hang(x: Float(), seconds: Float(0.0, 60.0) = 30.0, ctx=None):
    """Writes a partial file, signals $SDGRAPH_TEST_MARKER, then waits to be interrupted."""
    _executed("Hang")
    (Path(ctx.output_dir)).mkdir(parents=True, exist_ok=True)
    with ctx.output_file(Path(ctx.output_dir) / "first.txt") as tmp:
        tmp.write_text("complete")
    with ctx.output_file(Path(ctx.output_dir) / "hang.txt") as tmp:
        tmp.write_text("partial")
        marker = os.environ.get("SDGRAPH_TEST_MARKER")
        if marker:
            Path(marker).write_text("started")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            time.sleep(0.01)
