"""The BLAS set-up: which OpenBLAS kernels it asks for, and that the user's own choice wins."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sd.runtime import blas

ROOT = Path(__file__).resolve().parents[1]

SAPPHIRE_RAPIDS_VM = ("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                      "flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512dq avx512cd avx512bw avx512vl "
                      "avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")


def test_flags_are_read_from_the_first_processor():
    flags = blas.cpu_flags(SAPPHIRE_RAPIDS_VM.splitlines())
    assert {"avx512f", "avx2", "amx_tile"} <= flags and "fpu" in flags
    assert blas.cpu_flags(["processor : 0", "Features : fp asimd"]) == set()  # aarch64 names them differently


def test_reading_stops_at_the_first_flags_line():
    def lines():  # a many-core machine's /proc/cpuinfo is generated per processor as it is read
        yield "processor : 0"
        yield "flags : avx2 fma"
        raise AssertionError("read past the first processor's flags")

    assert blas.cpu_flags(lines()) == {"avx2", "fma"}


@pytest.mark.parametrize("flags, core", [
    ("avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16", "SkylakeX"),
    ("avx avx2 fma avx512f avx512cd", "Haswell"),   # Xeon Phi style AVX-512 without BW/VL: not SkylakeX
    ("avx avx2 fma", "Haswell"),                     # AMD Zen 1-3, Intel Haswell..Alder Lake
    ("avx avx2", None),                              # no FMA: leave OpenBLAS's own choice
    ("sse2 sse3", None),
    ("", None),
])
def test_core_family_from_flags(flags, core):
    assert blas.openblas_core_for(set(flags.split())) == core


def _setup_in_fresh_process(extra_env: dict) -> dict:
    code = ("import json, os\nfrom sd import runtime\nruntime.setup()\nfrom sd.runtime import blas\n"
            "print(json.dumps({'env': os.environ.get('OPENBLAS_CORETYPE'), 'core': blas.openblas_core(),"
            " 'doctor': blas.blas_in_use()}))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home()), **extra_env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS is loaded on Linux only")
def test_setup_asks_for_the_kernels_the_cpu_allows():
    wanted = blas.this_cpus_openblas_core()
    result = _setup_in_fresh_process({})
    if blas.openblas_core() is None:
        pytest.skip("the BLAS here is not OpenBLAS")
    assert result["env"] == wanted
    if wanted:
        assert result["core"] == wanted and "chosen by sdgraph" in result["doctor"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS is loaded on Linux only")
def test_the_users_coretype_wins():
    result = _setup_in_fresh_process({"OPENBLAS_CORETYPE": "Prescott"})
    if blas.openblas_core() is None:
        pytest.skip("the BLAS here is not OpenBLAS")
    assert result["env"] == "Prescott" and result["core"] == "Prescott"
    assert "OPENBLAS_CORETYPE" in result["doctor"] and "chosen by sdgraph" not in result["doctor"]
