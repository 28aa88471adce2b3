"""Two gloo processes on 127.0.0.1 that run test functions, every call bounded in time.

:class:`RankPool` spawns its ranks once (``torch.multiprocessing`` spawn) and keeps them: each
:meth:`RankPool.run` sends a module-level function and its arguments to every rank, which calls it
with the default process group initialized, and returns the ranks' results in rank order. An
exception on a rank fails the test with that rank's traceback; a call past its time limit (a
deadlock in a collective) kills the ranks, and the next call starts fresh ones.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

WORLD_SIZE = 2
CALL_TIMEOUT = 120.0
"""Seconds one call may take on every rank together (a first call also imports and connects)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, path: list[str], tasks, results) -> None:
    """A rank: join the gloo group, then call every task until told to stop (``None``)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        while (task := tasks.get()) is not None:
            function, args, kwargs = task
            try:
                results.put((rank, True, function(*args, **kwargs)))
            except BaseException:  # the test fails with the rank's traceback
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``world_size`` processes in one gloo group, started on the first :meth:`run`."""

    def __init__(self, world_size: int = WORLD_SIZE) -> None:
        self.world_size = world_size
        self._processes: list = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(self.world_size)]
        port = _free_port()
        self._processes = [
            context.Process(
                target=_serve,
                args=(rank, self.world_size, port, list(sys.path), self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, function, *args: Any, timeout: float = CALL_TIMEOUT, **kwargs: Any) -> list[Any]:
        """``function(*args, **kwargs)`` on every rank; the results in rank order."""
        if not self._processes or not all(p.is_alive() for p in self._processes):
            self.close()
            self._start()
        for tasks in self._tasks:
            tasks.put((function, args, kwargs))
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        failures: list[str] = []
        while len(results) + len(failures) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.close()
                if failures:
                    break
                raise TimeoutError(
                    f"{function.__name__} took more than {timeout} s on {self.world_size} ranks "
                    f"(answered: {sorted(results)}); the ranks were stopped."
                ) from None
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
                deadline = min(deadline, time.monotonic() + 10.0)  # the others may wait on it
        if failures:
            if len(results) + len(failures) < self.world_size:
                self.close()
            raise AssertionError(f"{function.__name__} failed\n" + "\n".join(failures))
        return [results[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (politely first)."""
        for tasks, process in zip(getattr(self, "_tasks", []), self._processes, strict=False):
            if process.is_alive():
                tasks.put(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        self._processes = []
