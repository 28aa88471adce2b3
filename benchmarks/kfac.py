"""Speed of KFAC: statistics, products, inverse-products and logdet, as ratios to forward+backward.

Workloads (random data, float32, 4096 examples in batches of 512, cross-entropy):

- ``mlp``: MLP 784-1024-1024-10 (ReLU);
- ``cnn``: Conv(3→16)-ReLU-MaxPool-Conv(16→32)-ReLU-MaxPool-Linear(2048→10) on 32x32 images;
- ``tokens``: Linear(256→256)-ReLU-Linear(256→10) on ``[N, 64, 256]`` token inputs (weight
  sharing over 64 positions; the loss averages over every token).

For each it times, in one run, a plain forward+backward pass over the data, then KFAC's
statistics pass (``fisher_type="mc"``, one sample), a product, the eigendecomposition
(first exact inverse) and an inverse-product with it, and ``logdet``, each as a ratio to the
forward+backward pass. On a GPU it also prints the peak memory of the statistics pass
against that of the forward+backward pass.

Usage: ``python benchmarks/kfac.py [--device cuda] [--workloads mlp cnn tokens] [--quick]``.
"""

from __future__ import annotations

import torch
from common import forward_backward, peak_memory, run, seconds, workload
from torch import nn

import curvops


def report(name: str, examples: int, batch: int, device: torch.device, min_run_time: float) -> None:
    """Time KFAC on one workload and print the ratios."""
    model, data = workload(name, examples, batch, device)
    loss_fn = nn.CrossEntropyLoss()
    reference = seconds(lambda: forward_backward(model, loss_fn, data), min_run_time)

    def build() -> curvops.CurvatureOperator:
        return curvops.KFAC(model, loss_fn, data)

    kfac = build()
    state = kfac.state_dict()
    v = torch.randn(kfac.shape[0], device=device)
    inverse = kfac.inverse(1e-3)
    rows = [
        ("statistics (factors)", seconds(build, min_run_time)),
        ("KFAC @ v", seconds(lambda: kfac @ v, min_run_time)),
        ("eigendecomposition", seconds(lambda: curvops.from_state_dict(state).inverse(1e-3), min_run_time)),
        ("inverse @ v", seconds(lambda: inverse @ v, min_run_time)),
        ("logdet(1e-3)", seconds(lambda: kfac.logdet(1e-3), min_run_time)),
    ]
    print(f"{name}: D = {kfac.shape[0]:,}; forward+backward {1e3 * reference:.1f} ms")
    for label, time in rows:
        print(f"  {label:<22} {1e3 * time:>10.1f} ms ({time / reference:5.2f}x)", flush=True)
    statistics_memory = peak_memory(build, device)
    if statistics_memory is not None:
        reference_memory = peak_memory(lambda: forward_backward(model, loss_fn, data), device)
        print(f"  peak memory: statistics {statistics_memory:.0f} MiB, ", end="")
        print(f"forward+backward {reference_memory:.0f} MiB")


if __name__ == "__main__":
    run(__doc__, "KFAC (fisher_type='mc', 1 sample)", report)
