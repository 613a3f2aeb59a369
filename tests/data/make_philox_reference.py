"""Record torch's CUDA randn for tests/test_philox.py (run on an NVIDIA GPU with torch; nothing else needed).

    python tests/data/make_philox_reference.py [out.npz]

Writes tests/data/philox_reference.npz: for each (seed, shape, call) case the first 16, the last 16 and 16
evenly spaced values of ``torch.randn(shape, device="cuda", generator=g)`` (the call-th call on one
generator seeded ``seed``), plus their float64 sum and sum of squares, and the GPU's SM count and threads
per SM (the launch grid of tensors larger than SMs * threads per SM depends on them). Sizes cross
torch's launch boundaries: 256-thread blocks, the full grid (SMs * threads per SM) and 4 values per thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

KEEP = 16
SEEDS = [0, 42, 12345, 2**32 - 1, 2**32 + 5, 2**64 - 1]


def shapes_for(grid_threads: int) -> list[tuple[int, ...]]:
    shapes = [
        (1,),
        (4,),
        (15,),
        (16,),
        (17,),
        (255,),
        (256,),
        (257,),
        (1000,),
        (1, 4, 64, 64),
        (2, 4, 64, 64),
        (1, 4, 96, 64),
        (1, 4, 128, 128),
        (4, 4, 128, 128),
    ]
    for multiple in (1, 2, 4, 5, 9):  # one draw per thread, then the unrolled 4 values, then several draws
        shapes += [(grid_threads * multiple - 1,), (grid_threads * multiple,), (grid_threads * multiple + 1,)]
    return shapes


def spaced_indices(numel: int) -> np.ndarray:
    """KEEP evenly spaced flat indices (the test recomputes them the same way)."""
    return np.linspace(0, numel - 1, KEEP).round().astype(np.int64)


def padded(values: np.ndarray) -> np.ndarray:
    out = np.full(KEEP, np.nan)
    out[: len(values)] = values
    return out


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("philox_reference.npz")
    props = torch.cuda.get_device_properties(0)
    sm_count, threads_per_sm = props.multi_processor_count, props.max_threads_per_multi_processor
    grid_threads = sm_count * threads_per_sm
    records: dict[str, np.ndarray] = {
        "sm_count": np.array(sm_count),
        "max_threads_per_sm": np.array(threads_per_sm),
        "device_name": np.array(props.name),
        "torch_version": np.array(torch.__version__),
    }
    cases = []
    rows: dict[str, list] = {"first": [], "last": [], "spaced": [], "sums": []}
    for seed in SEEDS:
        for shape in shapes_for(grid_threads):
            generator = torch.Generator(device="cuda").manual_seed(seed)
            calls = 2 if seed in (0, 2**64 - 1) else 1  # later calls check the offset advance
            for call in range(calls):
                values = (
                    torch.randn(shape, device="cuda", generator=generator).flatten().double().cpu().numpy()
                )
                rows["first"].append(padded(values[:KEEP]))
                rows["last"].append(padded(values[-KEEP:]))
                rows["spaced"].append(padded(values[spaced_indices(values.size)]))
                rows["sums"].append([values.sum(), (values * values).sum()])
                cases.append((seed, call, len(shape), *shape) + (0,) * (4 - len(shape)))
    # columns: seed (as two uint32 halves, lo then hi), call, ndim, shape padded to 4
    table = np.array([[s & 0xFFFFFFFF, s >> 32, c, n, *dims] for s, c, n, *dims in cases], dtype=np.uint64)
    records["cases"] = table
    for name in ("first", "last", "spaced"):
        records[name] = np.array(rows[name], dtype=np.float32)  # [cases, KEEP], NaN past a short tensor's end
    records["sums"] = np.array(rows["sums"], dtype=np.float64)
    np.savez_compressed(out, **records)
    print(
        f"wrote {len(cases)} cases from {props.name} ({sm_count} SMs, {threads_per_sm} threads/SM) to {out}"
    )

    # How close the numpy reproduction is (also what the test asserts), when run from the repository.
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from sd.sampling.philox import TorchCUDAGenerator
    except ImportError:
        return
    worst = 0.0
    for seed in (0, 42, 2**64 - 1):
        for shape in shapes_for(grid_threads):
            ours = TorchCUDAGenerator(seed, sm_count, threads_per_sm).randn(shape)
            theirs = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            worst = max(worst, float(np.abs(ours - theirs.cpu().numpy()).max()))
    print(f"largest |numpy - CUDA| over full tensors: {worst:.3g}")


if __name__ == "__main__":
    main()
