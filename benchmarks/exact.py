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

import argparse

import torch
from common import device_name, forward_backward, seconds, workload
from torch import nn

import curvops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--quick", action="store_true", help="64 examples: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    examples, batch, min_run_time = (64, 32, 0.01) if args.quick else (4096, 512, 1.0)
    print(f"exact curvature products on {device_name(device)}, float32, ", end="")
    print(f"{examples} examples in batches of {batch}")
    print("times in ms; (x) = ratio to one forward+backward pass over the same data\n")
    loss_fn = nn.CrossEntropyLoss()
    for workload_name in args.workloads:
        model, data = workload(workload_name, examples, batch, device)
        size = sum(p.numel() for p in model.parameters())
        reference = seconds(lambda: forward_backward(model, loss_fn, data), min_run_time)  # noqa: B023
        v = torch.randn(size, device=device)
        block = torch.randn(size, 16, device=device)
        rows = [
            ("GGN @ v", curvops.GGN(model, loss_fn, data), v),
            ("GGN @ V (16 columns)", curvops.GGN(model, loss_fn, data), block),
            ("Hessian @ v", curvops.Hessian(model, loss_fn, data), v),
            ("EmpiricalFisher @ v", curvops.EmpiricalFisher(model, loss_fn, data), v),
            ("FisherMC @ v", curvops.FisherMC(model, loss_fn, data), v),
        ]
        print(f"{workload_name}: D = {size:,}; forward+backward {1e3 * reference:.1f} ms")
        for label, op, x in rows:
            time = seconds(lambda: op @ x, min_run_time)  # noqa: B023
            print(f"  {label:<22} {1e3 * time:>10.1f} ms ({time / reference:5.2f}x)", flush=True)


if __name__ == "__main__":
    main()
