"""The execution context a node receives when it declares a `ctx` parameter."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph.errors import Cancelled


@dataclass(frozen=True)
class Folders:
    """Where models are read from, inputs found and outputs written (ComfyUI's layout by default)."""

    models_dir: Path = Path("models")
    input_dir: Path = Path("input")
    output_dir: Path = Path("output")

    @classmethod
    def from_env(cls, models_dir=None, input_dir=None, output_dir=None) -> Folders:
        """Explicit arguments win, then SDGRAPH_*_DIR environment variables, then ./models etc."""
        env = os.environ.get
        return cls(
            Path(models_dir or env("SDGRAPH_MODELS_DIR") or "models"),
            Path(input_dir or env("SDGRAPH_INPUT_DIR") or "input"),
            Path(output_dir or env("SDGRAPH_OUTPUT_DIR") or "output"),
        )


STALE_TEMP_SECONDS = 3600
_HELD_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP for a few instructions (publishing a file and recording it), so an
    interrupt lands before or after, never between: a file is either not there or known to the run.
    Python runs signal handlers in the main thread whichever thread the signal reached, so the handlers
    are swapped for a recorder here and a held signal is handed to its own handler on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {}
    for signum in _HELD_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):  # SIG_DFL / SIG_IGN / None (set outside Python) are left alone
            old[signum] = handler
            signal.signal(signum, lambda n, frame: held.append(n))
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        for signum in held[:1]:
            old[signum](signum, None)


def temp_owner_tag() -> str:
    """Part of every temp file's name: `<host>-<pid>`, so a later run can tell a dead process's leftovers
    from a live one's work in progress."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())[:40]}-{os.getpid()}"


_TEMP_TAG = re.compile(r"\.sdg-([A-Za-z0-9_]+)-(\d+)\.")


def is_stale_temp(path: Path, max_age: float = STALE_TEMP_SECONDS, untagged: bool = True) -> bool:
    """A hidden temp file of ours whose writer is gone: tagged with this host and a process that no longer
    exists, or another host's older than `max_age`; with `untagged`, also an untagged `.*.tmp` older than
    that (in the cache, which only sdgraph writes; not in an output folder, where it may be the user's)."""
    name = path.name
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    match = _TEMP_TAG.search(name)
    if not match and not untagged:
        return False
    if match and match.group(1) == temp_owner_tag().rsplit("-", 1)[0]:
        pid = int(match.group(2))
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False
    try:
        return time.time() - path.lstat().st_mtime > max_age
    except OSError:
        return False


def remove_stale_temps(folder: Path, depth: int = 1, untagged: bool = False) -> int:
    """Delete the temp files killed processes left in `folder` (and sub-folders down to `depth`);
    `untagged`: see is_stale_temp."""
    removed = 0
    try:
        children = list(Path(folder).iterdir())
    except OSError:
        return 0
    for child in children:
        try:
            if child.is_dir() and not child.is_symlink():
                if depth > 0:
                    removed += remove_stale_temps(child, depth - 1, untagged)
            elif is_stale_temp(child, untagged=untagged):
                child.unlink()
                removed += 1
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True,
                on_published: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path` (readers never see a
    half-written file), on failure it is removed. With overwrite=False an existing `path` (even one
    another process created meanwhile) is left alone and FileExistsError is raised. `on_published(path)`
    runs right after the rename with interrupts held (signals_held), so the caller's record of what it
    wrote is exact. The temp name carries this host and process (temp_owner_tag), so a later run can
    remove what a killed one left (remove_stale_temps)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:80]}.sdg-{temp_owner_tag()}.", suffix=".tmp",
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with signals_held():
            if overwrite:
                os.replace(tmp, target)
            else:
                _publish_exclusive(Path(tmp), target)
            if on_published is not None:
                on_published(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _publish_exclusive(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)  # atomic, and fails if target exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a tiny race remains)
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclass
class ExecutionContext:
    """Passed to nodes that declare `ctx`. One per node execution; the run-wide parts are shared."""

    node_id: str
    node_type: str
    folders: Folders
    run_info: dict[str, Any]
    cache_dir: Path
    on_progress: Callable[[str, int, int], None] = lambda node, step, total: None
    on_log: Callable[[str, str], None] = lambda node, msg: None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    written_files: list[Path] = field(default_factory=list)
    fingerprinter: Callable[[Path], str] | None = None

    @property
    def output_dir(self) -> Path:
        return self.folders.output_dir

    @property
    def input_dir(self) -> Path:
        return self.folders.input_dir

    @property
    def models_dir(self) -> Path:
        return self.folders.models_dir

    def progress(self, step: int, total: int) -> None:
        """Report progress (e.g. sampling step 3 of 20); also a cancellation point."""
        self.check_cancelled()
        self.on_progress(self.node_id, step, total)

    def check_cancelled(self) -> None:
        """Raise Cancelled if the run was cancelled; call it in long loops."""
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")

    def is_cancelled(self) -> bool:
        """For code that polls (e.g. a sampler's `cancel=ctx.is_cancelled`); any exception a node raises
        after cancellation is reported as a cancellation, not a failure."""
        return self.cancel_event.is_set()

    def fingerprint(self, path: str | os.PathLike) -> str:
        """The file's fingerprint (size, mtime, content hash; the hash is computed once per file
        version and remembered)."""
        if self.fingerprinter is None:
            from graph.fingerprint import FingerprintIndex

            self.fingerprinter = FingerprintIndex().fingerprint
        return self.fingerprinter(Path(path))

    def log(self, msg: str) -> None:
        self.on_log(self.node_id, msg)

    def register_file(self, path: str | os.PathLike) -> Path:
        """Record an output file this node wrote: listed in the run summary, removed if the run fails."""
        p = Path(path)
        self.written_files.append(p)
        return p

    @contextlib.contextmanager
    def output_file(self, path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
        """Write an output file atomically: `with ctx.output_file(p) as tmp: image.save(tmp, "PNG")`.
        overwrite=False raises FileExistsError if `p` exists by then (pick the next counter and retry)."""
        with atomic_path(path, overwrite, on_published=self.register_file) as tmp:
            yield tmp
            with contextlib.suppress(OSError):  # mkstemp's 0600 -> what open() would have given
                os.chmod(tmp, 0o666 & ~_umask())
