"""Memory of KFAC on a large MLP: the estimate before any pass, the real tensor bytes, and the
peak resident memory above the import baseline while building the operator and its inverse.

    python benchmarks/memory.py                      # the 21M-parameter MLP 1024-4096-4096-10
    python benchmarks/memory.py --sizes 1024 2048 2048 10 --decomposition-dtype float32

The peaks are Linux's ``VmHWM`` (``/proc/self/status``), reset before each phase by writing ``5``
to ``/proc/self/clear_refs``; the baseline is ``VmRSS`` after importing torch and curvops. The
ratio is the larger peak over the bytes of the operator (factors and cached decompositions) plus
its inverse's own tensors.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time

import torch
from torch import nn

import curvops
from curvops.linalg.factor import factors_of
from curvops.linalg.memory import _readable

MiB = 2**20


def resident() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in bytes."""
    status = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def distinct_bytes(tensors) -> int:
    seen = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}
    return sum(t.element_size() * t.numel() for t in seen.values())


def state_tensors(state: dict) -> list[torch.Tensor]:
    tensors = [t for t in state["tensors"].values() if t.is_floating_point()]
    for child in state["children"]:
        tensors += state_tensors(child)
    return tensors


def decompositions(op: curvops.CurvatureOperator) -> list[torch.Tensor]:
    factors = {id(f): f for f in factors_of([op]) if not f.diagonal and f.decomposed}
    return [t for f in factors.values() for t in (*f.eigh(), f.noise())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 4096, 10])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--decomposition-dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args()
    decomposition_dtype = getattr(torch, args.decomposition_dtype)
    baseline, _ = resident()

    torch.manual_seed(0)
    sizes = args.sizes
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    data = [
        (torch.randn(args.batch, sizes[0]), torch.randint(0, sizes[-1], (args.batch,)))
        for _ in range(args.examples // args.batch)
    ]
    numel = sum(p.numel() for p in model.parameters())
    print(
        f"MLP {'-'.join(map(str, sizes))}: {numel / 1e6:.1f}M parameters, float32, {args.examples} examples"
    )
    print(f"decompositions in {decomposition_dtype}; {torch.get_num_threads()} threads\n")
    estimate = curvops.memory_estimate(model, decomposition_dtype=decomposition_dtype)
    print(estimate, "\n")

    reset_peak()
    start = time.perf_counter()
    op = curvops.KFAC(model, nn.CrossEntropyLoss(), data, decomposition_dtype=decomposition_dtype)
    build_time = time.perf_counter() - start
    build_peak = resident()[1] - baseline
    factors = distinct_bytes(state_tensors(op.state_dict()))

    reset_peak()
    start = time.perf_counter()
    inverse = op.inverse(damping=1e-3)
    inverse_time = time.perf_counter() - start
    inverse_peak = resident()[1] - baseline
    cached = decompositions(op)
    kept = {t.data_ptr() for t in cached}
    own = distinct_bytes([t for t in state_tensors(inverse.state_dict()) if t.data_ptr() not in kept])
    eigenbases = distinct_bytes(cached)
    total = factors + eigenbases + own

    rows = [
        ("factors", estimate.factors, factors),
        ("eigenbases", estimate.eigenbases, eigenbases),
        ("inverse", estimate.inverse, own),
        ("operator + inverse", estimate.operator + estimate.inverse, total),
    ]
    print(f"{'tensors':<20} {'estimate':>12} {'real':>12}")
    for name, guess, real in rows:
        print(f"{name:<20} {_readable(guess):>12} {_readable(real):>12}")
    model_bytes = numel * 4 + sum(x.numel() * 4 for x, _ in data)
    print(f"\nmodel and data: {_readable(model_bytes)}")
    print(f"peak RSS above the import baseline: build {_readable(build_peak)} ({build_time:.1f} s), ", end="")
    print(f"inverse {_readable(inverse_peak)} ({inverse_time:.1f} s)")
    print(f"peak / (operator + inverse) = {max(build_peak, inverse_peak) / total:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
