"""Every environment variable sdgraph reads, in one table, and the one parser of on/off switches.

`SWITCHES` lists each variable with its default and a one-line description; `sdgraph --help` and
`sdgraph doctor` print it. Boolean switches are read with `flag(name)`, which accepts 1/0, true/false,
yes/no, on/off (any case, surrounding spaces ignored; empty or unset means the default) and raises
`SwitchError`, naming the variable and the accepted spellings, for anything else.

Most variables are read where they are used: graph/ reads its folder and cache settings itself (it must not
import sd), so their entries here describe them only. Importing this module reads nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sd.runtime import mlx_settings

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class SwitchError(ValueError):
    """An environment variable holds a value sdgraph cannot read."""


@dataclass(frozen=True)
class Switch:
    name: str
    default: str          # as it would be written in the environment; "" = unset / nothing
    description: str
    kind: str = "text"    # "bool" switches are read with flag(), "auto-bool" (auto/on/off) with auto_flag();
                          # the others are described only here
    shown_default: str = ""   # how --help shows the default when `default` is not a value (e.g. a folder)

    def default_text(self) -> str:
        return self.shown_default or self.default or "none"


SWITCHES: tuple[Switch, ...] = (
    # sd: model code and acceleration
    Switch("SDGRAPH_FAST", "1", "compiled fast path for UNet/VAE/CLIP (0: the plain modules, for debugging)",
           "bool"),
    Switch("SDGRAPH_CPU_KERNELS", "1", "sdgraph's C kernels for MLX's Linux CPU backend (0: MLX's own ops)",
           "bool"),
    Switch("SDGRAPH_COMPILE", "auto", "NVIDIA: compiled GPU graphs (auto: once `sdgraph warmup` or a "
           "compiled run built them on this GPU; a first run goes uncompiled, not minutes compiling)",
           "auto-bool"),
    Switch("SDGRAPH_CUDA_KERNELS", "1", "sdgraph's CUDA kernels on an NVIDIA GPU (0: MLX's own ops)", "bool"),
    Switch("SDGRAPH_BLAS", "", "BLAS library for MLX's Linux CPU backend: a path, or 'none' for MLX's own",
           shown_default="first of OpenBLAS/MKL/BLIS found"),
    Switch("CC", "", "C compiler for the CPU kernels", shown_default="cc, gcc or clang"),
    Switch("OMP_WAIT_POLICY", "PASSIVE",
           "OpenMP threads of the CPU kernels sleep when idle (sdgraph's default)"),
    Switch("MLX_MAX_MB_PER_BUFFER", mlx_settings.DEFAULTS["MLX_MAX_MB_PER_BUFFER"],
           "MLX CUDA backend: MB of new buffers per CUDA graph (sdgraph's default on Linux)"),
    Switch("MLX_PTX_CACHE_DIR", "", "MLX CUDA backend: where MLX keeps the GPU kernels it compiles",
           shown_default="<cache>/kernels/mlx-<version>-ptx"),
    Switch("SDGRAPH_RNG", "cpu", "KSampler's default noise_device: whose noise a seed gives (cpu: ComfyUI on "
           "the CPU, cuda: ComfyUI on NVIDIA, a1111: A1111's GPU seeds)"),
    # graph: folders and caches (read by graph/ itself)
    Switch("SDGRAPH_MODELS_DIR", "", "model folder (checkpoints/, loras/)", shown_default="./models"),
    Switch("SDGRAPH_INPUT_DIR", "", "input folder (LoadImage)", shown_default="./input"),
    Switch("SDGRAPH_OUTPUT_DIR", "", "output folder (SaveImage)", shown_default="./output"),
    Switch("SDGRAPH_CACHE_DIR", "", "disk cache folder (also <cache>/kernels for the CPU kernels)",
           shown_default="user cache folder/sdgraph"),
    Switch("SDGRAPH_CACHE_MAX_BYTES", "", "disk cache size budget (bytes, 1e9, or 10G, 512M)",
           shown_default="10 GiB"),
    Switch("SDGRAPH_MEMORY_CACHE_BYTES", "", "in-process cache budget in bytes",
           shown_default="half the memory"),
    Switch("SDGRAPH_MODEL_CACHE_BYTES", "", "loaded models' budget (bytes, or 8G, 512M, 1.5G)",
           shown_default="half the RAM / GPU memory"),
    # cli
    Switch("SDGRAPH_EXTRA_NODES", "", "comma-separated modules or .py files with more nodes"),
    Switch("SDGRAPH_DEBUG", "0", "print a failing node's traceback", "bool"),
    # distributed sweeps (set by `sdgraph run --distributed` for its ranks)
    Switch("SDGRAPH_DIST_BACKEND", "", "backend the ranks were launched for (set by --distributed)",
           shown_default="guessed from the launcher"),
    Switch("SDGRAPH_DIST_STATUS_DIR", "", "where ranks report progress to the --distributed parent"),
)

BY_NAME: dict[str, Switch] = {s.name: s for s in SWITCHES}


def parse_bool(name: str, text: str | None, default: bool) -> bool:
    """`text` (the value of variable `name`) as a boolean; None or blank gives `default`."""
    if text is None or not text.strip():
        return default
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SwitchError(f"{name}={text!r} is not a boolean; use one of "
                      f"{', '.join(TRUE_WORDS)} (on) or {', '.join(FALSE_WORDS)} (off)")


def flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """The boolean switch `name` (it must be in SWITCHES as a "bool"), from the environment."""
    switch = BY_NAME[name]
    if switch.kind != "bool":
        raise KeyError(f"{name} is not a boolean switch")
    env = os.environ if environ is None else environ
    return parse_bool(name, env.get(name), parse_bool(name, switch.default, False))


def auto_flag(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """The switch `name` (an "auto-bool" of SWITCHES): None for auto (its default), else on or off."""
    switch = BY_NAME[name]
    if switch.kind != "auto-bool":
        raise KeyError(f"{name} is not an auto/on/off switch")
    env = os.environ if environ is None else environ
    text = env.get(name)
    if text is None or not text.strip() or text.strip().lower() == "auto":
        return None
    try:
        return parse_bool(name, text, False)
    except SwitchError:
        raise SwitchError(f"{name}={text!r} is not auto, on or off; use auto, or one of "
                          f"{', '.join(TRUE_WORDS)} (on) or {', '.join(FALSE_WORDS)} (off)") from None


def check(environ: Mapping[str, str] | None = None) -> list[str]:
    """Why each boolean switch that is set cannot be read (empty when all are fine)."""
    problems = []
    for s in SWITCHES:
        try:
            if s.kind == "bool":
                flag(s.name, environ)
            elif s.kind == "auto-bool":
                auto_flag(s.name, environ)
        except SwitchError as e:
            problems.append(str(e))
    return problems


def current(environ: Mapping[str, str] | None = None) -> list[tuple[Switch, str | None, bool]]:
    """(switch, its value or None when unset, whether that is the default) for every switch."""
    env = os.environ if environ is None else environ
    rows = []
    for s in SWITCHES:
        value = env.get(s.name)
        if value is None or not value.strip():
            rows.append((s, value, True))
            continue
        if s.kind in ("bool", "auto-bool"):
            read = flag if s.kind == "bool" else auto_flag
            try:
                is_default = read(s.name, {s.name: value}) == read(s.name, {})
            except SwitchError:
                is_default = False
        else:
            is_default = value == s.default
        rows.append((s, value, is_default))
    return rows


def help_text(width: int = 28) -> str:
    """The "environment:" section of `sdgraph --help`."""
    lines = ["environment:"]
    for s in SWITCHES:
        lines.append(f"  {s.name.ljust(width)}{s.description} (default: {s.default_text()})")
    return "\n".join(lines)
