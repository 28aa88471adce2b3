"""Influence scores with the query gradients compressed to rank ``r`` per Kronecker block
(``query_rank``), against the exact scores: error, agreement of the top training examples,
the numbers a query holds, and time, in one run.

Workload: an MLP 784-256-256-10 (ReLU) on random data with 10 classes, float32; 1024 training
examples, 128 queries; EKFAC (``bias="joint"``), heuristic damping, fitted once
(:class:`curvops.influence.Influence`). For each rank it prints the relative Frobenius error of
the ``[128, 1024]`` scores, the mean overlap of each query's top-10 training examples with the
exact top 10, the numbers one query's compressed gradient holds against the exact one's, and
the scoring time as a ratio to one forward+backward pass over the training data.

Usage: ``python benchmarks/influence_low_rank.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse

import torch
from common import device_name, forward_backward, timed
from torch import nn

from curvops.influence import Influence

RANKS = (1, 4, 16, 64, 256)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="64 training examples, 8 queries")
    args = parser.parse_args()
    device = torch.device(args.device)
    train_count, query_count = (64, 8) if args.quick else (1024, 128)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = model.to(device).eval()
    x, y = (
        torch.randn(train_count + query_count, 784, device=device),
        torch.randint(0, 10, (train_count + query_count,)),
    )
    y = y.to(device)
    train = [(xb, yb) for xb, yb in zip(x[:train_count].split(256), y[:train_count].split(256), strict=True)]
    query = (x[train_count:], y[train_count:])
    loss_fn = nn.CrossEntropyLoss()
    print(f"query_rank on {device_name(device)}, float32: MLP 784-256-256-10, {train_count} training "
          f"examples, {query_count} queries, EKFAC")  # fmt: skip
    reference = timed(lambda: forward_backward(model, loss_fn, train))
    influence = Influence(model, loss_fn, train, curvature="ekfac", query_batch_size=query_count).fit()
    exact = influence.scores(query)  # also the warm-up
    seconds = timed(lambda: influence.scores(query))
    top = exact.topk(10, dim=1).indices
    layers = [(256, 785), (256, 257), (10, 257)]  # [W b] per layer
    full = sum(m * n for m, n in layers)
    print(f"forward+backward over the training data: {1e3 * reference:.1f} ms")
    header = ("rank", "rel. error", "top-10 overlap", "numbers/query", "ms", "/fwd+bwd")
    print("{:>6} {:>11} {:>15} {:>14} {:>9} {:>9}".format(*header))
    row = "{:>6} {:>11.2e} {:>15.2f} {:>14,} {:>9.1f} {:>8.2f}x"
    print(row.format("exact", 0.0, 1.0, full, 1e3 * seconds, seconds / reference))
    for rank in RANKS:
        compressed = influence.scores(query, query_rank=rank)
        seconds = timed(lambda rank=rank: influence.scores(query, query_rank=rank))
        error = float((compressed - exact).norm() / exact.norm())
        overlap = sum(
            len(set(a.tolist()) & set(b.tolist()))
            for a, b in zip(compressed.topk(10, dim=1).indices, top, strict=True)
        ) / (10 * len(top))
        held = sum(min(rank * (m + n), m * n) for m, n in layers)  # a block saving nothing stays exact
        print(row.format(rank, error, overlap, held, 1e3 * seconds, seconds / reference))


if __name__ == "__main__":
    main()
