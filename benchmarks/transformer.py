"""Speed of KFAC, EKFAC and TKFAC on a GPT, as ratios to a forward+backward pass.

The model is ``examples/tiny_models.py``'s :class:`TinyGPT` at 4 layers, width 256, 4 heads
and 128 tokens (3.2M parameters) on the character-level corpus of Python's standard library
(``Corpus.standard_library``: 96 characters), float32, batches of 16 sequences,
``nn.CrossEntropyLoss`` over every token (logits ``[N, V, S]``, targets ``[N, S]``),
``fisher_type="mc"`` with one sample. It times, in one run: KFAC (the statistics pass and the
blocks, no inversion); EKFAC end to end (statistics, eigendecompositions, the correction pass);
TKFAC (one pass) — each as a ratio to a plain forward+backward pass over the same data, timed
next to it (on a shared machine the load drifts). Targets: KFAC ≤ 3x, EKFAC ≤ 8x (printed,
not asserted).

Usage: ``python benchmarks/transformer.py [--device cuda] [--batches 4] [--quick]``
(``--quick``: 2 layers, width 32, 16 tokens, batches of 4: checks the script runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import device_name, forward_backward, seconds
from torch import nn

import curvops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import Corpus, TinyGPT

FULL = {"layers": 4, "width": 256, "heads": 4, "tokens": 128, "batch": 16}
QUICK = {"layers": 2, "width": 32, "heads": 2, "tokens": 16, "batch": 4}
TARGETS = {"KFAC": 3.0, "EKFAC": 8.0}


def workload(size: dict[str, int], batches: int, device: torch.device) -> tuple[nn.Module, list]:
    """The GPT of ``size`` and ``batches`` next-character batches of the corpus."""
    torch.manual_seed(0)
    corpus = Corpus.standard_library()
    model = TinyGPT(corpus.vocabulary, size["width"], size["layers"], size["heads"], size["tokens"])
    data = [(x.to(device), y.to(device)) for x, y in corpus.batches(batches, size["batch"], size["tokens"])]
    return model.to(device), data


def report(size: dict[str, int], batches: int, device: torch.device, min_run_time: float) -> None:
    """Time the approximations on one GPT and print the ratios."""
    model, data = workload(size, batches, device)
    loss_fn = nn.CrossEntropyLoss()
    builders = {
        "KFAC": lambda: curvops.KFAC(model, loss_fn, data),
        "EKFAC": lambda: curvops.EKFAC(model, loss_fn, data),
        "TKFAC": lambda: curvops.TKFAC(model, loss_fn, data),
    }
    dimension = sum(p.numel() for p in model.parameters())
    print(
        f"GPT: {size['layers']} layers, width {size['width']}, {size['heads']} heads, "
        f"{size['tokens']} tokens; D = {dimension:,}"
    )
    for label, build in builders.items():
        # the reference is timed next to each approximation: on a shared machine the load drifts
        reference = seconds(lambda: forward_backward(model, loss_fn, data), min_run_time)
        time = seconds(build, min_run_time)
        target = f", target {TARGETS[label]:g}x" if label in TARGETS else ""
        print(
            f"  {label:<6} {1e3 * time:>9.1f} ms ({time / reference:5.2f}x; "
            f"forward+backward {1e3 * reference:.1f} ms{target})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=4, help="batches of the data set")
    parser.add_argument("--quick", action="store_true", help="a small GPT: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    size, min_run_time = (QUICK, 0.01) if args.quick else (FULL, 1.0)
    print(f"KFAC, EKFAC and TKFAC (fisher_type='mc', 1 sample) on {device_name(device)}, float32, ", end="")
    print(f"{args.batches} batches of {size['batch']} sequences")
    print("times in ms; (x) = ratio to one forward+backward pass over the same data\n")
    report(size, args.batches, device, min_run_time)


if __name__ == "__main__":
    main()
