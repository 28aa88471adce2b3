"""Speed of the exact, matrix-free curvature operators, as ratios to a forward+backward pass.

Workloads (random data, float32):

- ``mlp``: MLP 784-1024-1024-10 (ReLU), cross-entropy, 4096 examples in batches of 512;
- ``cnn``: Conv(3→16)-ReLU-MaxPool-Conv(16→32)-ReLU-MaxPool-Linear(2048→10) on 32x32 RGB
  images, cross-entropy, 4096 examples in batches of 512.

For each it times, in one run, one plain forward+backward pass over the whole data set
(``loss.backward()`` per batch) and then one product over the same data: ``GGN @ v``,
``GGN @ V`` with 16 columns, ``Hessian @ v``, ``EmpiricalFisher @ v`` and ``FisherMC @ v``
(one sample), each printed as a ratio to the forward+backward pass.

Usage: ``python benchmarks/exact.py [--device cuda] [--workloads mlp cnn] [--quick]``.
"""

from __future__ import annotations

import torch
from common import forward_backward, run, seconds, workload
from torch import nn

import curvops


def report(name: str, examples: int, batch: int, device: torch.device, min_run_time: float) -> None:
    """Time the exact operators' products on one workload and print the ratios."""
    model, data = workload(name, examples, batch, device)
    loss_fn = nn.CrossEntropyLoss()
    size = sum(p.numel() for p in model.parameters())
    reference = seconds(lambda: forward_backward(model, loss_fn, data), min_run_time)
    v = torch.randn(size, device=device)
    block = torch.randn(size, 16, device=device)
    rows = [
        ("GGN @ v", curvops.GGN(model, loss_fn, data), v),
        ("GGN @ V (16 columns)", curvops.GGN(model, loss_fn, data), block),
        ("Hessian @ v", curvops.Hessian(model, loss_fn, data), v),
        ("EmpiricalFisher @ v", curvops.EmpiricalFisher(model, loss_fn, data), v),
        ("FisherMC @ v", curvops.FisherMC(model, loss_fn, data), v),
    ]
    print(f"{name}: D = {size:,}; forward+backward {1e3 * reference:.1f} ms")
    for label, op, x in rows:
        time = seconds(lambda: op @ x, min_run_time)  # noqa: B023
        print(f"  {label:<22} {1e3 * time:>10.1f} ms ({time / reference:5.2f}x)", flush=True)


if __name__ == "__main__":
    run(__doc__, "exact curvature products", report, workloads=("mlp", "cnn"))
