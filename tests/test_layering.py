"""The import rules between the layers, and that importing a module does no work (DESIGN.md).

- graph/ (the engine) imports nothing from sd/, nodes/, cli or MLX;
- sd/ (the model code) imports nothing from graph/, nodes/ or cli;
- tests import nothing from bench/.
Every import counts, also those inside functions, relative ones and `importlib.import_module("...")`.
And importing every module of sd/, graph/, nodes/ and cli changes no environment variable and loads no BLAS;
`import sd` / `import graph` do not import mlx; and it leaves the process as it was (threads, libraries, MLX
settings and random keys, files, ...: the state probe below).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RULES = {  # layer -> top-level packages it must not import
    "graph": ("sd", "nodes", "cli", "mlx"),
    "sd": ("graph", "nodes", "cli"),
    "tests": ("bench",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Every module `source` (the text of module `module`) imports, as absolute dotted names."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.add(node.args[0].value)
    return found


def violations(layer: str, source: str, module: str = "", is_package: bool = False) -> list[str]:
    banned = RULES[layer]
    return sorted(name for name in imports_of(source, module, is_package) if name.split(".")[0] in banned)


def layer_files(layer: str) -> list[Path]:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, layer
    return files


def _check(layer: str) -> dict[str, list[str]]:
    bad = {}
    for path in layer_files(layer):
        found = violations(layer, path.read_text(), module_name(path), path.name == "__init__.py")
        if found:
            bad[str(path.relative_to(ROOT))] = found
    return bad


# ------------------------------------------------------------------------------ the checker can fail
@pytest.mark.parametrize("layer, source, expected", [
    ("graph", "import mlx.core as mx", ["mlx.core"]),
    ("graph", "def f():\n    from sd.runtime import blas\n", ["sd.runtime", "sd.runtime.blas"]),
    ("graph", "import importlib\nimportlib.import_module('nodes.models')", ["nodes.models"]),
    ("graph", "class A:\n    def m(self):\n        import cli\n", ["cli"]),
    ("graph", "import graph.executor\nimport numpy\nimport mlxish", []),
    ("sd", "from graph.disk_cache import default_cache_dir", ["graph.disk_cache",
                                                             "graph.disk_cache.default_cache_dir"]),
    ("sd", "try:\n    import nodes\nexcept ImportError:\n    pass\n", ["nodes"]),
    ("sd", "import mlx.core\nfrom sd import runtime", []),
    ("tests", "from bench.reference import read_state", ["bench.reference", "bench.reference.read_state"]),
    ("tests", "import benchmark_tools", []),
])
def test_checker_finds_banned_imports(layer, source, expected):
    assert violations(layer, source) == expected


def test_checker_resolves_relative_imports():
    assert violations("sd", "from ..graph import x", "sd.accel.fast") == []  # sd.graph is not graph
    assert imports_of("from .naming import tagged_stem", "graph.distributed", True) == {
        "graph.distributed.naming", "graph.distributed.naming.tagged_stem"}
    assert imports_of("from .. import errors", "graph.distributed.runner") == {"graph", "graph.errors"}


def test_checker_reads_the_layers():
    """The real files are found and parsed (a rule over no files would pass whatever they import)."""
    names = {module_name(p) for p in layer_files("graph")}
    assert {"graph.executor", "graph.distributed", "graph.distributed.world"} <= names
    assert "graph.executor" in imports_of((ROOT / "graph" / "runner.py").read_text(), "graph.runner")


# ------------------------------------------------------------------------------------ the real rules
def test_graph_imports_no_sd_nodes_cli_or_mlx():
    assert _check("graph") == {}


@pytest.mark.slow
def test_sd_imports_no_graph_nodes_or_cli():
    assert _check("sd") == {}


@pytest.mark.slow
def test_tests_import_nothing_from_bench():
    assert _check("tests") == {}


# --------------------------------------------------------------------------- importing does no work
_IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys
before = dict(os.environ)
import sd, graph
light = {"sd": "mlx" in sys.modules or "mlx.core" in sys.modules}
names = ["cli"]
for package in ("sd", "graph", "nodes"):
    names.append(package)
    pkg = importlib.import_module(package)
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
from sd.runtime import blas
with open("/proc/self/maps") if sys.platform.startswith("linux") else open(os.devnull) as f:
    maps = f.read()
after = dict(os.environ)
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
print(json.dumps({"modules": len(names), "mlx_after_sd_graph": light["sd"], "changed": changed,
                  "blas_loaded": blas._loaded, "openblas_mapped": "libopenblas" in maps,
                  "mlx_imported": "mlx.core" in sys.modules}))
"""


def _run(code: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_importing_every_module_does_no_work():
    result = _run(_IMPORT_ALL)
    assert result["modules"] > 50
    assert result["mlx_imported"]  # the nodes import MLX: the check below ran after it
    assert not result["mlx_after_sd_graph"], "`import sd` / `import graph` imported mlx"
    assert result["changed"] == [], "importing changed the environment"
    assert result["blas_loaded"] is None and not result["openblas_mapped"], "importing loaded a BLAS"


def test_setup_does_the_work_once():
    """The same probe after sd.runtime.setup(): it loaded the BLAS and set sdgraph's defaults (so the test
    above can fail), and a second call changes nothing but the kernel folder."""
    code = ("import os\nfrom sd import runtime\nbefore = dict(os.environ)\nruntime.setup('/tmp/a')\n"
            "once = dict(os.environ)\nruntime.setup('/tmp/b')\nimport json, sys\n"
            "from sd.runtime import blas\n"
            "print(json.dumps({'changed': sorted(k for k in once if before.get(k) != once[k]),"
            " 'again': once == dict(os.environ), 'blas': blas._loaded,"
            " 'kernels': str(runtime.kernel_cache_dir()), 'mlx': 'mlx.core' in sys.modules}))\n")
    result = _run(code)
    if sys.platform.startswith("linux"):
        assert "OMP_WAIT_POLICY" in result["changed"] and "MLX_MAX_MB_PER_BUFFER" in result["changed"]
        assert "MLX_PTX_CACHE_DIR" in result["changed"]  # under /tmp/a/kernels: the first call's folder
    assert result["again"] and result["kernels"] == "/tmp/b/kernels" and not result["mlx"]


# ------------------------------------------- importing leaves the whole process as it was (no hidden work)
# The probe first imports every third-party module the project's modules pull in (their import-time work is
# theirs), takes a snapshot of the process's state, imports the project's modules and reports what changed:
# threads, loaded shared libraries, MLX settings and random key, numpy's global random state, warning
# filters, logging, atexit hooks, signal handlers, and files in HOME, TMPDIR and the working folder (fresh,
# empty folders here). Given module names instead, it reports what each of them changed.
_STATE_PROBE = r"""
import atexit, faulthandler, importlib, json, logging, os, pkgutil, signal, sys, threading, warnings
PROJECT = ("sd", "graph", "nodes", "cli")


def project_modules():
    names = ["cli"]
    for package in ("sd", "graph", "nodes"):
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [m.name for m in pkgutil.walk_packages(path, package + ".")]
    return names


if sys.argv[1] == "deps":  # the third-party modules importing the project pulls in
    start = set(sys.modules)
    for name in project_modules():
        importlib.import_module(name)
    print(json.dumps(sorted(n for n in sys.modules if n not in start and n.split(".")[0] not in PROJECT)))
    raise SystemExit
deps, given = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in deps:
    try:
        importlib.import_module(name)
    except Exception:
        pass
import mlx.core as mx
import numpy as np


def snapshot():
    prev = mx.set_cache_limit(0)
    mx.set_cache_limit(prev)
    mlx = {"device": str(mx.default_device()), "stream": str(mx.default_stream(mx.default_device())),
           "memory_limit": mx.get_memory_limit(), "cache_limit": prev,
           "random_key": np.array(mx.random.state[0]).tolist()}
    with open("/proc/self/maps") if sys.platform.startswith("linux") else open(os.devnull) as f:
        libs = sorted({line.split()[-1] for line in f if ".so" in line})
    tasks = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0
    roots = (os.environ["HOME"], os.environ["TMPDIR"], os.getcwd())
    return {"mlx": mlx, "env": sorted(os.environ.items()), "threads": len(threading.enumerate()),
            "os_threads": tasks, "libs": libs, "numpy_random": np.random.get_state()[1][:4].tolist(),
            "recursion_limit": sys.getrecursionlimit(), "switch_interval": sys.getswitchinterval(),
            "warning_filters": len(warnings.filters), "log_handlers": len(logging.getLogger().handlers),
            "log_level": logging.getLogger().level, "atexit": atexit._ncallbacks(),
            "faulthandler": faulthandler.is_enabled(), "excepthook": repr(sys.excepthook),
            "signals": [repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)],
            "cwd": os.getcwd(), "umask": os.umask(os.umask(0o22)),
            "files": sorted(os.path.join(d, f) for root in roots for d, _, fs in os.walk(root) for f in fs)}


def changed(before, after):
    return sorted(k for k in before if before[k] != after[k])


snapshot()  # once before the baseline: MLX starts a worker thread of its own after its first evaluation
if given:
    report = {}
    for name in given:
        before = snapshot()
        importlib.import_module(name)
        report[name] = changed(before, snapshot())
else:
    before = snapshot()
    names = project_modules()
    for name in names:
        importlib.import_module(name)
    report = {"modules": len(names), "changed": changed(before, snapshot())}
print(json.dumps(report))
"""


def _state_probe(tmp_path: Path, deps: list[str] | None = None, given: list[str] | None = None,
                 extra_path: Path | None = None) -> dict:
    """Runs the probe in a fresh interpreter with empty HOME, TMPDIR and working folder; `deps=None`: it
    asks a first interpreter which third-party modules the project imports, and returns them as "deps"."""
    home, tmp, cwd = (tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd")
    for folder in (home, tmp, cwd):
        folder.mkdir()
    path = f"{ROOT}:{extra_path}" if extra_path else str(ROOT)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": str(home), "TMPDIR": str(tmp)}

    def probe(*args: str):
        proc = subprocess.run([sys.executable, "-c", _STATE_PROBE, *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    found = probe("deps") if deps is None else deps
    return {**probe(json.dumps(found), json.dumps(given or [])), "deps": found}


@pytest.mark.slow
def test_importing_every_module_leaves_the_process_as_it_was(tmp_path):
    result = _state_probe(tmp_path)
    assert result["modules"] > 50
    assert "mlx.core" in result["deps"]
    assert not any(n.split(".")[0] == "torch" for n in result["deps"])  # no PyTorch at run time
    assert result["changed"] == [], result["changed"]


BUSY_MODULES = {  # a module body doing work at import -> what the probe must see change
    "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()":
        ["os_threads", "threads"],
    "import mlx.core as mx\nmx.set_cache_limit(1 << 20)": ["mlx"],
    "import mlx.core as mx\nmx.random.seed(1)": ["mlx"],
    "import numpy as np\nnp.random.seed(1)": ["numpy_random"],
    "import os\nos.environ['OMP_WAIT_POLICY'] = 'PASSIVE'": ["env"],
    "import warnings\nwarnings.simplefilter('ignore')": ["warning_filters"],
    "import atexit\natexit.register(print)": ["atexit"],
    "import ctypes\nctypes.CDLL('libgomp.so.1')": ["libs"],
    "from pathlib import Path\n(Path.home() / '.cache' / 'sdgraph').mkdir(parents=True)\n"
    "(Path.home() / '.cache' / 'sdgraph' / 'k.so').write_bytes(b'')": ["files"],
}


@pytest.mark.slow
def test_the_state_probe_sees_work_at_import(tmp_path):
    """The probe above can fail: a module doing each kind of work at import is seen (one interpreter)."""
    extra = tmp_path / "extra"
    extra.mkdir()
    for i, body in enumerate(BUSY_MODULES):
        (extra / f"busy_{i}.py").write_text(body + "\n")
    result = _state_probe(tmp_path, deps=[], given=[f"busy_{i}" for i in range(len(BUSY_MODULES))],
                          extra_path=extra)
    assert [result[f"busy_{i}"] for i in range(len(BUSY_MODULES))] == list(BUSY_MODULES.values())
