"""Eigendecompositions spread over ranks: ``decompose_blocks`` on 2 gloo processes against one.

    python benchmarks/distributed_eigh.py                      # 8 factors of 1024-2048
    python benchmarks/distributed_eigh.py --sizes 512 512 1024 1024 --threads 1

The script spawns its processes on 127.0.0.1 (``torch.multiprocessing``): first one process
decomposes every factor of 8 KFAC-like blocks alone, then 2 ranks decompose them spread (each
factor on one rank, the largest first to the least loaded, then broadcast), each with the same
number of threads; the time of the spread run is that of its slowest rank, broadcasts included.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvops
from curvops.distributed import Shards, decompose_blocks


def blocks_of(sizes: list[int]) -> list[curvops.CurvatureOperator]:
    """One ``Dense`` block per factor ``x x^T / 2n`` (the same on every rank: a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    blocks = []
    for n in sizes:
        x = torch.randn(n, 2 * n, generator=g)
        blocks.append(curvops.Dense(x @ x.T / (2 * n)))
    return blocks


def run(rank: int, world: int, port: int, sizes: list[int], threads: int, results) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    blocks = blocks_of(sizes)
    if world == 1:
        start = time.perf_counter()
        decompose_blocks(blocks)
        results.put((rank, time.perf_counter() - start))
        return
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=30),
    )
    try:
        dist.barrier()
        start = time.perf_counter()
        decompose_blocks(blocks, Shards.of())
        results.put((rank, time.perf_counter() - start))
    finally:
        dist.destroy_process_group()


def timed(world: int, sizes: list[int], threads: int) -> float:
    """Seconds of the slowest of ``world`` spawned processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=run, args=(r, world, port, sizes, threads, results)) for r in range(world)
    ]
    for p in processes:
        p.start()
    times = [results.get()[1] for _ in processes]
    for p in processes:
        p.join()
    return max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 1024, 1280, 1280, 1536, 1536, 2048, 2048]
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args()
    threads = f"{args.threads} thread(s) per process"
    print(f"{len(args.sizes)} factors {args.sizes}, float32, eigh in float64, {threads}")
    alone = timed(1, args.sizes, args.threads)
    spread = timed(2, args.sizes, args.threads)
    print(f"one process: {alone:.2f} s; 2 gloo ranks: {spread:.2f} s; speed-up {alone / spread:.2f}x")


if __name__ == "__main__":
    main()
