"""Speed of Kronecker products and exact damped inverse products.

For factor sizes ``n`` (both factors ``n x n``, so ``D = n²``) it times, in one run:

- ``fwd+bwd``: a plain forward and backward pass of ``nn.Linear(n, n)`` on a batch of 512 —
  the layer whose curvature block ``G ⊗ A`` this is; every other time is printed as a
  ratio to it;
- ``matvec``: ``(G ⊗ A) v``;
- ``eigh``: the factors' eigendecompositions (once per inverse, then cached);
- ``inv-matvec``: ``(G ⊗ A + λI)^-1 v`` with the cached eigenbasis;
- ``dense matvec`` / ``dense solve``: the same with the ``D x D`` matrix, where it fits
  in ``--dense-budget-gib`` (Cholesky solve, factorisation included).

Usage: ``python benchmarks/kronecker.py [--sizes 256 1024 4096] [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer

import curvops


def seconds(stmt, **names) -> float:
    """Median seconds of ``stmt`` (torch.utils.benchmark; synchronises CUDA)."""
    return Timer(stmt=stmt, globals=names).blocked_autorange(min_run_time=0.2).median


def random_spd(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    b = torch.randn(n, n, dtype=dtype, device=device)
    return b @ b.T / n + 1e-2 * torch.eye(n, dtype=dtype, device=device)


def forward_backward(n: int, batch: int, dtype: torch.dtype, device: torch.device) -> float:
    layer = torch.nn.Linear(n, n, device=device, dtype=dtype)
    x = torch.randn(batch, n, device=device, dtype=dtype)
    return seconds("layer(x).square().mean().backward()", layer=layer, x=x)


def row(n: int, dtype: torch.dtype, device: torch.device, damping: float, budget_gib: float) -> dict:
    g, a = random_spd(n, dtype, device), random_spd(n, dtype, device)
    op = curvops.Kronecker(g, a)
    v = torch.randn(n * n, dtype=dtype, device=device)
    result = {"n": n, "D": n * n, "fwd+bwd": forward_backward(n, 512, dtype, device)}
    result["matvec"] = seconds("op @ v", op=op, v=v)
    result["eigh"] = seconds("curvops.Kronecker(g, a).eigendecompositions()", curvops=curvops, g=g, a=a)
    inverse = op.inverse(damping)
    result["inv-matvec"] = seconds("inverse @ v", inverse=inverse, v=v)
    dense_bytes = (n * n) ** 2 * torch.finfo(dtype).bits // 8
    if dense_bytes <= budget_gib * 2**30:
        with curvops.linalg.memory_budget(int(budget_gib * 2**30)):
            dense = op.to_dense()
        shifted = dense + damping * torch.eye(n * n, dtype=dtype, device=device)
        result["dense matvec"] = seconds("dense @ v", dense=dense, v=v)
        result["dense solve"] = seconds(
            "torch.cholesky_solve(v[:, None], torch.linalg.cholesky(m))", torch=torch, m=shifted, v=v
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256, 1024, 4096])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--dense-budget-gib", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    sizes = [8, 16, 32] if args.quick else args.sizes
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"Kronecker G ⊗ A with n x n factors, {args.dtype} on {name}, damping {args.damping}")
    print("times in ms; (x) = ratio to one forward+backward of nn.Linear(n, n) on 512 examples\n")
    columns = ["fwd+bwd", "matvec", "eigh", "inv-matvec", "dense matvec", "dense solve"]
    print(f"{'n':>5} {'D':>9} " + " ".join(f"{c:>20}" for c in columns) + f" {'dense/Kron solve':>17}")
    for n in sizes:
        result = row(n, dtype, device, args.damping, args.dense_budget_gib)
        cells = []
        for column in columns:
            if column not in result:
                cells.append(f"{'too big':>20}")
                continue
            ms, ratio = 1e3 * result[column], result[column] / result["fwd+bwd"]
            cells.append(f"{ms:>11.3f} ({ratio:>6.2f}x)")
        speedup = (
            f"{result['dense solve'] / (result['eigh'] + result['inv-matvec']):>16.0f}x"
            if "dense solve" in result
            else f"{'-':>17}"
        )
        print(f"{n:>5} {n * n:>9} " + " ".join(cells) + " " + speedup, flush=True)


if __name__ == "__main__":
    main()
