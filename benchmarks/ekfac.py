"""Speed of EKFAC and TKFAC, as ratios to a forward+backward pass.

On the workloads of ``benchmarks/common.py`` (MLP, CNN, token model; float32, 4096 examples
in batches of 512, cross-entropy, ``fisher_type="mc"`` with one sample) it times, in one run:
a plain forward+backward pass over the data (the reference); KFAC's statistics pass; the
factors' eigendecompositions (in the factors' dtype, as EKFAC's); EKFAC end to end for each
correction strategy asked for (default ``auto``; forcing ``gramian`` on the CNN's 1024-position
first layer, or ``per-example`` on the wide MLP, is slow by design) and the corrections alone
(EKFAC minus statistics minus eigendecompositions: from the statistics pass's kept inputs and
output gradients where they fit in ``CORRECTION_CACHE_BYTES``, else a second pass); TKFAC (one
pass) and TEKFAC. On a GPU it prints each strategy's peak memory.

Usage: ``python benchmarks/ekfac.py [--device cuda] [--workloads mlp cnn tokens]
[--strategies auto per-example gramian] [--quick]``.
"""

from __future__ import annotations

import torch
from common import forward_backward, peak_memory, run, seconds, workload
from torch import nn

import curvops


def report(
    name: str, examples: int, batch: int, device: torch.device, min_run_time: float, strategies: list[str]
) -> None:
    """Time EKFAC and TKFAC on one workload and print the ratios."""
    model, data = workload(name, examples, batch, device)
    loss_fn = nn.CrossEntropyLoss()
    reference = seconds(lambda: forward_backward(model, loss_fn, data), min_run_time)
    kfac = curvops.KFAC(model, loss_fn, data, decomposition_dtype=torch.float32)  # EKFAC's: the factors'

    def eigendecompositions() -> None:
        for block in kfac.blocks:
            curvops.from_state_dict(block.state_dict()).eigendecompositions()

    statistics = seconds(lambda: curvops.KFAC(model, loss_fn, data), min_run_time)
    eigh = seconds(eigendecompositions, min_run_time)
    rows = [("KFAC statistics", statistics), ("eigendecompositions", eigh)]
    for strategy in strategies:
        total = seconds(lambda: curvops.EKFAC(model, loss_fn, data, correction=strategy), min_run_time)  # noqa: B023
        rows += [
            (f"EKFAC ({strategy})", total),
            (f"  corrections ({strategy})", total - statistics - eigh),
        ]
    rows.append(("TKFAC", seconds(lambda: curvops.TKFAC(model, loss_fn, data), min_run_time)))
    tekfac = seconds(lambda: curvops.TKFAC(model, loss_fn, data, eigenvalue_correction=True), min_run_time)
    rows.append(("TEKFAC", tekfac))
    print(f"{name}: D = {kfac.shape[0]:,}; forward+backward {1e3 * reference:.1f} ms")
    for label, time in rows:
        print(f"  {label:<32} {1e3 * time:>10.1f} ms ({time / reference:5.2f}x)", flush=True)
    for strategy in strategies:
        memory = peak_memory(lambda: curvops.EKFAC(model, loss_fn, data, correction=strategy), device)  # noqa: B023
        if memory is not None:
            print(f"  peak memory, EKFAC ({strategy}): {memory:.0f} MiB")


if __name__ == "__main__":
    strategies = {"nargs": "+", "default": ["auto"], "choices": ["auto", "per-example", "gramian"]}
    run(__doc__, "EKFAC and TKFAC (fisher_type='mc', 1 sample)", report, options={"strategies": strategies})
