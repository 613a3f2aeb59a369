"""The import rules between the layers, and that importing a module does no work (DESIGN.md).

- graph/ (the engine) imports nothing from sd/, nodes/, cli or MLX;
- sd/ (the model code) imports nothing from graph/, nodes/ or cli;
- tests import nothing from bench/.
Every import counts, also those inside functions, relative ones and `importlib.import_module("...")`.
And importing every module of sd/, graph/, nodes/ and cli changes no environment variable and loads no BLAS;
`import sd` / `import graph` do not import mlx.
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


def test_sd_imports_no_graph_nodes_or_cli():
    assert _check("sd") == {}


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
