"""sd/runtime/switches.py: one table of the environment variables sdgraph reads, one boolean parser."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest

from sd.runtime import switches
from sd.runtime.switches import SwitchError, flag, parse_bool

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "True", " yes ", "on", "On\n", "YES"])
def test_true_spellings(text):
    assert parse_bool("X", text, False) is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", " no", "off", "Off ", "No"])
def test_false_spellings(text):
    assert parse_bool("X", text, True) is False


@pytest.mark.parametrize("text", [None, "", "   "])
def test_blank_is_the_default(text):
    assert parse_bool("X", text, True) is True and parse_bool("X", text, False) is False


@pytest.mark.parametrize("text", ["2", "maybe", "enabled", "y", "-1", "truee"])
def test_other_values_are_refused_by_name(text):
    with pytest.raises(SwitchError) as e:
        parse_bool("SDGRAPH_FAST", text, True)
    message = str(e.value)
    assert "SDGRAPH_FAST" in message and repr(text) in message
    assert all(w in message for w in ("1", "true", "yes", "on", "0", "false", "no", "off"))


def test_flag_reads_the_environment_with_the_registered_default(monkeypatch):
    monkeypatch.delenv("SDGRAPH_FAST", raising=False)
    monkeypatch.delenv("SDGRAPH_DEBUG", raising=False)
    assert flag("SDGRAPH_FAST") is True and flag("SDGRAPH_DEBUG") is False
    monkeypatch.setenv("SDGRAPH_FAST", "off")
    monkeypatch.setenv("SDGRAPH_DEBUG", "Yes")
    assert flag("SDGRAPH_FAST") is False and flag("SDGRAPH_DEBUG") is True
    monkeypatch.setenv("SDGRAPH_CPU_KERNELS", "nope")
    with pytest.raises(SwitchError, match="SDGRAPH_CPU_KERNELS"):
        flag("SDGRAPH_CPU_KERNELS")
    assert switches.check() == [str(pytest.raises(SwitchError, flag, "SDGRAPH_CPU_KERNELS").value)]


def test_the_kernel_switches_use_the_parser(monkeypatch):
    from sd.accel import cpu_kernels, cuda_kernels

    for module, name in ((cpu_kernels, "SDGRAPH_CPU_KERNELS"), (cuda_kernels, "SDGRAPH_CUDA_KERNELS")):
        monkeypatch.setenv(name, " OFF ")
        assert module.disabled()
        monkeypatch.setenv(name, "on")
        assert not module.disabled()
        monkeypatch.setenv(name, "bogus")
        with pytest.raises(SwitchError, match=name):
            module.disabled()


def test_only_registered_names_are_booleans():
    with pytest.raises(KeyError):
        flag("SDGRAPH_CACHE_DIR")
    with pytest.raises(KeyError):
        flag("SDGRAPH_NOT_A_SWITCH")


@pytest.mark.slow
def test_every_sdgraph_variable_in_the_code_is_registered():
    """A string constant SDGRAPH_* anywhere in sd/, graph/, nodes/, cli.py names a registered switch."""
    names = set()
    files = [ROOT / "cli.py", *(p for d in ("sd", "graph", "nodes") for p in (ROOT / d).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(re.findall(r"\bSDGRAPH_[A-Z][A-Z0-9_]*[A-Z0-9]\b", node.value))
    assert "SDGRAPH_CACHE_DIR" in names and "SDGRAPH_FAST" in names  # the scan sees them
    names -= {"SDGRAPH_"}  # prefixes in prose
    assert sorted(names - set(switches.BY_NAME)) == []


def test_current_says_what_is_default(monkeypatch):
    monkeypatch.delenv("SDGRAPH_FAST", raising=False)
    monkeypatch.setenv("SDGRAPH_DEBUG", "1")
    monkeypatch.setenv("SDGRAPH_CPU_KERNELS", "yes")  # a spelling of the default
    rows = {s.name: (value, is_default) for s, value, is_default in switches.current()}
    assert rows["SDGRAPH_FAST"] == (None, True)
    assert rows["SDGRAPH_DEBUG"] == ("1", False)
    assert rows["SDGRAPH_CPU_KERNELS"] == ("yes", True)
    assert set(rows) == set(switches.BY_NAME)


def test_help_lists_every_switch(capsys):
    import cli

    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("environment:"):]
    for s in switches.SWITCHES:
        assert re.search(rf"^  {s.name} .*\(default: ", section, re.M), s.name


def test_doctor_lists_every_switch_with_its_value(monkeypatch):
    from nodes.doctor import _switches

    monkeypatch.setenv("SDGRAPH_DEBUG", "on")
    monkeypatch.delenv("SDGRAPH_FAST", raising=False)
    out = io.StringIO()
    _switches(out)
    lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:]}
    assert set(lines) == set(switches.BY_NAME)
    assert "on (set; default: 0)" in lines["SDGRAPH_DEBUG"]
    assert "unset (default: 1)" in lines["SDGRAPH_FAST"]


def test_a_bad_switch_stops_the_cli_with_status_2(monkeypatch, capsys):
    import cli

    monkeypatch.setenv("SDGRAPH_FAST", "maybe")
    assert cli.main(["nodes"]) == 2
    assert "SDGRAPH_FAST='maybe' is not a boolean" in capsys.readouterr().err
