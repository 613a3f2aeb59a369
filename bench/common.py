"""Timing, memory and checkpoint helpers shared by the bench sections."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass
class Row:
    """One line of the result table: what was measured, and each implementation's figure."""

    section: str
    what: str
    unit: str
    values: dict[str, float] = field(default_factory=dict)  # implementation -> median
    note: str = ""


def median_time(fn, sync, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall time (seconds) of fn() + sync(result) over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def interleaved(impls: dict, rounds: int, per_round: int = 1, warmup: int = 1,
                on_round=None) -> dict[str, list[float]]:
    """Wall times (seconds) of each implementation, timed in turn: `per_round` calls of each per round, so a
    machine whose speed drifts during the run weighs on all alike. `warmup` untimed calls of each first;
    `on_round(r, times)` after each round (progress lines)."""
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(rounds):
        for name, fn in impls.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(r, times)
    return times


def mlx_unet_loop(fast, x, t, c, steps: int = 20) -> None:
    """`steps` UNet calls as a sampler makes them: each fed the previous one's output, pipelined by
    sd.sampling.ksampler.StepPipeline (step i evaluates while step i+1's graph is built)."""
    import mlx.core as mx

    from sd.sampling.ksampler import StepPipeline

    xx, pipeline = x, StepPipeline()
    for i in range(steps):
        d = fast(xx, t, c)
        xx = xx - 1e-3 * d
        pipeline(i, xx, d)
    mx.eval(xx)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Samples this process's RSS every few ms in a thread; `.peak` is the largest seen while active."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def ensure_checkpoint(path: Path, size: str, dtype: str = "float16") -> Path:
    """A random SD1.5-shaped checkpoint in the real layout (written once, reused)."""
    path = Path(path)
    if not path.exists():
        from sd.synthetic import make_checkpoint

        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tmp = path.with_name(path.stem + ".partial" + path.suffix)
        make_checkpoint(tmp, size=size, dtype=dtype)
        tmp.rename(path)
        gib, secs = path.stat().st_size / 2**30, time.perf_counter() - start
        print(f"[bench] wrote {path} ({gib:.2f} GiB) in {secs:.0f} s",
              flush=True)
    return path


def machine_info(device: str) -> dict:
    import mlx.core as mx
    import numpy as np

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "device": device,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "gpu" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            try:
                info["cudnn"] = torch.backends.cudnn.version()
            except RuntimeError as e:
                info["cudnn"] = f"unavailable: {str(e)[:80]}"
    except ImportError:
        pass
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device == "cpu":
        from sd.runtime.blas import blas_in_use

        info["mlx_cpu_blas"] = blas_in_use()
    info["load_avg"] = os.getloadavg()[0]
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def drop_file_cache(path: Path) -> bool:
    """Evict a file's pages from the page cache (no root needed for clean pages); True if it worked."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False
