"""Speed of the optimizers: one training step, as a ratio to a plain forward+backward pass.

Workloads as in ``benchmarks/kfac.py`` (random data, float32, batches of 512, cross-entropy).
For each it times, in one run, a forward+backward pass on one batch, then a full training
step (``zero_grad``, forward, backward, ``step``) of SGD with momentum, Adam, and
``KFACOptimizer`` with KFAC, EKFAC and TKFAC (``fisher_type="mc"``, statistics every step,
``T_stats = 1``, and every 10 steps, ``T_stats = 10``; the preconditioner rebuilt every
``T_inv = 10 T_stats`` steps), and a step of ``ZerothOrderOptimizer`` (three forward passes,
no backward). The curvature steps are averaged over a whole ``T_inv`` cycle, so the
amortised eigendecompositions are included.

Usage: ``python benchmarks/optim.py [--device cuda] [--workloads mlp cnn tokens] [--quick]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from common import run, seconds, timed, workload
from torch import nn
from torch.optim import Optimizer

import curvops


def _optimizers(model: nn.Module, loss_fn: nn.Module) -> list[tuple[str, Callable[[], Optimizer], int]]:
    """``(label, factory, steps per timed cycle)``; one optimizer (and its hooks) at a time."""
    rows = [
        ("SGD (momentum)", lambda: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), 20),
        ("Adam", lambda: torch.optim.Adam(model.parameters(), lr=1e-4), 20),
    ]
    for curvature in ("kfac", "ekfac", "tkfac"):
        for period in (1, 10):

            def factory(curvature=curvature, period=period) -> Optimizer:
                return curvops.optim.KFACOptimizer(
                    model, loss_fn, curvature=curvature, lr=1e-4, damping=1e-2, T_stats=period,
                    T_inv=10 * period,
                )  # fmt: skip

            rows.append((f"{curvature.upper()} T_stats={period}", factory, 10 * period))
    return rows


def report(name: str, examples: int, batch: int, device: torch.device, min_run_time: float) -> None:
    """Time one step of every optimizer on one workload and print the ratios."""
    model, data = workload(name, examples, batch, device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data[0]

    def forward_backward(cycle: int = 20) -> None:
        for _ in range(cycle):
            model.zero_grad()
            loss_fn(model(x), y).backward()

    forward_backward(cycle=5)  # warm up the allocator and thread pool
    before = timed(forward_backward) / 20
    rows = []
    for label, factory, cycle in _optimizers(model, loss_fn):
        optimizer = factory()

        def steps(optimizer=optimizer, cycle=cycle) -> None:
            for _ in range(cycle):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()

        steps(cycle=1)  # the first statistics and preconditioner
        time = timed(steps) / cycle
        if isinstance(optimizer, curvops.optim.KFACOptimizer):
            optimizer.remove_hooks()
        rows.append((label, time))
    zeroth_order = curvops.optim.ZerothOrderOptimizer(model.parameters(), lr=1e-4)
    with torch.no_grad():
        rows.append(
            ("zeroth-order", seconds(lambda: zeroth_order.step(lambda: loss_fn(model(x), y)), min_run_time))
        )
    after = timed(forward_backward) / 20
    reference = (before + after) / 2
    size = sum(p.numel() for p in model.parameters())
    print(f"{name}: {size:,} parameters; forward+backward of one batch {1e3 * reference:.1f} ms "
          f"(mean of {1e3 * before:.1f} before and {1e3 * after:.1f} after the optimizers)")  # fmt: skip
    for label, time in rows:
        print(f"  {label:<20} {1e3 * time:>10.1f} ms ({time / reference:5.2f}x)", flush=True)


if __name__ == "__main__":
    run(__doc__, "Optimizer steps", report)
