"""Deterministic output names for distributed sweeps (imports nothing: sinks use it)."""

from __future__ import annotations

from typing import Any

FILE_TAG = "file_tag"  # run_info key: the variation id, set by the distributed runner


def tagged_stem(stem: str, run_info: dict[str, Any] | None) -> str:
    """A sink's file-name stem for this run: `stem_<variation id>` in a distributed sweep, else `stem`.

    Sinks call it before adding their counter, e.g. SaveImage writes `{prefix}_{id}_{counter:05}_.png`:
    the first (and usually only) file of a variation is `_00001_` whichever rank made it, and a plain
    `sdgraph run` (no tag) keeps `{prefix}_{counter:05}_.png`."""
    tag = (run_info or {}).get(FILE_TAG)
    return f"{stem}_{tag}" if tag else stem
