"""examples/distributed_kfac.py runs under torchrun on two gloo processes (127.0.0.1), and as one
process without a process group; the operators over the shards are those of all the data."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distributed_kfac.py"
sys.path.insert(0, str(EXAMPLE.parent))

from distributed_kfac import Shard  # noqa: E402

TINY = ["--epochs", "2", "--steps", "3", "--examples", "301", "--batch-size", "32"]
TIMEOUT = 90
NUMBER = r"(-?\d+\.\d+(?:e[-+]\d+)?)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(arguments: list[str]) -> str:
    """The example's standard output; fails with its output if it exits with an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on the loopback interface only
    done = subprocess.run(
        [sys.executable, *arguments, str(EXAMPLE), *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def two_ranks() -> str:
    port = _free_port()
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    return _run([*launcher, f"--master_port={port}"])


@pytest.fixture(scope="module")
def one_process() -> str:
    return _run([])


def _values(output: str, pattern: str) -> list[float]:
    return [float(v) for v in re.findall(pattern, output)]


def _operators(output: str) -> dict[str, tuple[float, float]]:
    """``{"KFAC": (logdet, trace), "EKFAC": ...}`` as printed in part (a)."""
    found = re.findall(rf"(E?KFAC): logdet\(F \+ \S+ I\) {NUMBER}\s+trace {NUMBER}", output)
    return {name: (float(logdet), float(trace)) for name, logdet, trace in found}


def test_two_ranks_hold_the_operators_of_all_the_data(two_ranks):
    assert "over 2 shard(s)" in two_ranks
    differences = _values(two_ranks, rf"relative difference {NUMBER}")
    assert len(differences) == 2 and max(differences) < 1e-10, two_ranks
    assert set(_operators(two_ranks)) == {"KFAC", "EKFAC"}


def test_two_ranks_give_the_logdet_and_trace_of_one_process(two_ranks, one_process):
    sharded, alone = _operators(two_ranks), _operators(one_process)
    assert set(alone) == {"KFAC", "EKFAC"}
    for name, (logdet, trace) in alone.items():
        assert sharded[name][0] == pytest.approx(logdet, rel=1e-9, abs=1e-8)
        assert sharded[name][1] == pytest.approx(trace, rel=1e-9, abs=1e-8)


def test_two_ranks_train_with_ddp_as_one_process_on_the_global_batch(two_ranks, one_process):
    assert "KFACOptimizer on DistributedDataParallel" in two_ranks
    for label in ("training loss", "test accuracy"):
        sharded, alone = _values(two_ranks, rf"{label} {NUMBER}"), _values(one_process, rf"{label} {NUMBER}")
        assert len(sharded) == len(alone) == 2, two_ranks
        assert sharded == pytest.approx(alone, abs=2e-6), label


def test_two_ranks_fit_laplace_and_influence_over_the_shards(two_ranks, one_process):
    assert "N = 301" in two_ranks  # the loss terms of the union, not of one shard
    sharded, alone = _values(two_ranks, rf"log marginal likelihood {NUMBER}")
    assert sharded == pytest.approx(alone, rel=1e-9), two_ranks
    (single,) = _values(one_process, rf"log marginal likelihood {NUMBER}")  # the same trained model
    assert sharded == pytest.approx(single, rel=1e-6)
    sharded, alone = re.findall(r"(?:shard\(s\)|all the data): (\[[\d, ]+\])", two_ranks)
    assert sharded == alone and re.search(rf"1 shard\(s\): {re.escape(sharded)}", one_process), two_ranks


def test_one_process_runs_without_a_process_group(one_process):
    assert "over 1 shard(s)" in one_process and "KFACOptimizer on one process" in one_process
    assert "one process on all the data" not in one_process
    assert "N = 301" in one_process and len(_values(one_process, rf"log marginal likelihood {NUMBER}")) == 1


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_shards_hold_every_example_once(size, shuffle):
    data = list(range(11))
    shards = [list(Shard(data, num_replicas=size, rank=rank, shuffle=shuffle)) for rank in range(size)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(shard) for shard in shards] == [len(range(r, 11, size)) for r in range(size)]
    assert [len(Shard(data, num_replicas=size, rank=r)) for r in range(size)] == [len(s) for s in shards]
