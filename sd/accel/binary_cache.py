"""Compiled kernels kept in sdgraph's kernel folder, loaded only when sdgraph itself built them.

Used by the CPU kernels (a shared library per compiler/CPU) and the CUDA kernels (a cubin per kernel variant
and GPU architecture). The folder and the cache folder above it are created 0700. A binary is used only if
it is a regular file of this user, writable by no one else, whose sha256 is the one recorded
(`<name>.sha256`) when this code built it; a planted, swapped or unrecorded binary is removed and rebuilt,
never loaded. Writers build under a private `.build-<pid>-*` name and rename into place, so processes that
race (distributed ranks) each end with a complete file; leftovers of killed builds are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def record(built: Path, target: Path) -> None:
    """Remember the content hash of the binary this process just built (written before the binary is renamed
    into place, so a binary under the final name always has its record)."""
    fd, tmp = tempfile.mkstemp(prefix=f".build-{os.getpid()}-", suffix=".sha256", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest(built) + "\n")
    os.replace(tmp, record_path(target))


def verified(target: Path) -> bool:
    """Whether `target` is a binary sdgraph built (see the module docstring). Anything else is not used."""
    try:
        st = os.lstat(target)
        recorded = record_path(target).read_text().strip()
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
            return False
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return False
        return digest(target) == recorded
    except OSError:
        return False


def discard(target: Path) -> None:
    for p in (target, record_path(target)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise RuntimeError(f"{target} is not a binary sdgraph built and cannot be removed ({e}); "
                               "remove it or run `sdgraph cache clear`") from e


def private_dir(folder: Path) -> None:
    """The kernels' folder and the cache folder above it, created readable by this user only (0700)."""
    for p in (folder.parent, folder):
        try:
            p.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as e:
            raise RuntimeError(f"cannot create {p} ({e})") from e


def remove_dead_builds(folder: Path) -> None:
    """The half-written `.build-<pid>-*` files of killed builds (their process is gone)."""
    for p in folder.glob(".build-*"):
        try:
            pid = int(p.name.split("-")[1])
            if pid != os.getpid():
                os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                p.unlink()
        except (ValueError, IndexError, OSError):
            continue


def read(target: Path) -> bytes | None:
    """The binary's bytes if sdgraph built it; None when absent. A binary that fails `verified` is removed."""
    if not (target.exists() or target.is_symlink()):
        return None
    if verified(target):
        return target.read_bytes()
    discard(target)
    return None


def store(target: Path, data: bytes) -> None:
    """Write `data` as `target` with its record, atomically (best effort: an unwritable folder only means the
    next process compiles again)."""
    private_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".build-{os.getpid()}-", suffix=target.suffix, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        record(Path(tmp), target)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
