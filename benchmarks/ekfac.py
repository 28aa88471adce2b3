"""Speed of EKFAC and TKFAC, as ratios to a forward+backward pass.

On the workloads of ``benchmarks/common.py`` (MLP, CNN, token model; float32, 4096 examples
in batches of 512, cross-entropy, ``fisher_type="mc"`` with one sample) it times, in one run:
a plain forward+backward pass over the data (the reference); KFAC's statistics pass; the
factors' eigendecompositions; EKFAC end to end for each correction strategy
(``"per-example"``, ``"gramian"``) and the correction pass alone (EKFAC minus statistics
minus eigendecompositions); TKFAC (one pass) and TEKFAC. On a GPU it prints each strategy's
peak memory.

Usage: ``python benchmarks/ekfac.py [--device cuda] [--workloads mlp cnn tokens] [--quick]``.
"""

from __future__ import annotations

import argparse

import torch
from common import WORKLOADS, device_name, forward_backward, seconds, workload
from torch import nn

import curvops


def peak_memory(function, device: torch.device) -> float | None:
    """Peak GPU memory (MiB) allocated while ``function()`` runs; ``None`` on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    function()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - start) / 2**20


def report(name: str, examples: int, batch: int, device: torch.device, min_run_time: float) -> None:
    """Time EKFAC and TKFAC on one workload and print the ratios."""
    model, data = workload(name, examples, batch, device)
    loss_fn = nn.CrossEntropyLoss()
    reference = seconds(lambda: forward_backward(model, loss_fn, data), min_run_time)
    kfac = curvops.KFAC(model, loss_fn, data)

    def eigendecompositions() -> None:
        for block in kfac.blocks:
            curvops.from_state_dict(block.state_dict()).eigendecompositions()

    statistics = seconds(lambda: curvops.KFAC(model, loss_fn, data), min_run_time)
    eigh = seconds(eigendecompositions, min_run_time)
    rows = [("KFAC statistics", statistics), ("eigendecompositions", eigh)]
    for strategy in ("per-example", "gramian"):
        total = seconds(lambda: curvops.EKFAC(model, loss_fn, data, correction=strategy), min_run_time)  # noqa: B023
        rows += [
            (f"EKFAC ({strategy})", total),
            (f"  correction pass ({strategy})", total - statistics - eigh),
        ]
    rows.append(("TKFAC", seconds(lambda: curvops.TKFAC(model, loss_fn, data), min_run_time)))
    tekfac = seconds(lambda: curvops.TKFAC(model, loss_fn, data, eigenvalue_correction=True), min_run_time)
    rows.append(("TEKFAC", tekfac))
    print(f"{name}: D = {kfac.shape[0]:,}; forward+backward {1e3 * reference:.1f} ms")
    for label, time in rows:
        print(f"  {label:<32} {1e3 * time:>10.1f} ms ({time / reference:5.2f}x)", flush=True)
    for strategy in ("per-example", "gramian"):
        memory = peak_memory(lambda: curvops.EKFAC(model, loss_fn, data, correction=strategy), device)  # noqa: B023
        if memory is not None:
            print(f"  peak memory, EKFAC ({strategy}): {memory:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--quick", action="store_true", help="64 examples: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    examples, batch, min_run_time = (64, 32, 0.01) if args.quick else (4096, 512, 1.0)
    print(
        f"EKFAC and TKFAC on {device_name(device)}, float32, {examples} examples in batches of {batch}, ",
        end="",
    )
    print("fisher_type='mc' (1 sample)")
    print("times in ms; (x) = ratio to one forward+backward pass over the same data\n")
    for workload_name in args.workloads:
        report(workload_name, examples, batch, device, min_run_time)


if __name__ == "__main__":
    main()
