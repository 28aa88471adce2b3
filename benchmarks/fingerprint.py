"""Cost of the checks every pass of a model operator makes, as a share of one GGN product.

Workload: ``mlp`` (MLP 784-1024-1024-10, ReLU, cross-entropy, 4096 examples in batches of
512; see ``common.workload``). It times, in one run:

- ``GGN @ v``: one product, a pass over the data;
- the stale check (``ModelData.check_fresh``): version counters and storage addresses of
  every parameter and buffer, then their sums and sums of squares (one device sync);
- the pass check: each batch's sums and sums of squares of ``X`` and ``y``
  (``PassRecord.add``), fetched once per pass (``PassRecord.finish``);

and prints each check's time as a percentage of the product (the target: under 2%).

Usage: ``python benchmarks/fingerprint.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import torch
from common import run, seconds, workload
from torch import nn

import curvops
from curvops.nn.passes import PassRecord


def record_pass(data: list) -> None:
    """The pass check's work on ``data``: every batch recorded, the sums fetched once."""
    record = PassRecord()
    for x, y in data:
        record.add(x, y)
    record.finish()


def report(name: str, examples: int, batch: int, device: torch.device, min_run_time: float) -> None:
    """Time one GGN product and the two checks; print the checks as % of the product."""
    model, data = workload(name, examples, batch, device)
    op = curvops.GGN(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], device=device)
    product = seconds(lambda: op @ v, min_run_time)
    stale = seconds(op._model.check_fresh, min_run_time)
    passes = seconds(lambda: record_pass(data), min_run_time)
    print(f"{name}: D = {op.shape[0]:,}; GGN @ v {1e3 * product:.1f} ms")
    for label, time in (("stale check", stale), ("pass check", passes)):
        print(f"  {label:<12} {1e3 * time:>8.2f} ms ({100 * time / product:5.2f}% of GGN @ v)", flush=True)


if __name__ == "__main__":
    run(__doc__, "per-pass checks", report, workloads=("mlp",))
