"""KFAC, EKFAC, natural-gradient training, a Laplace approximation and influence over data shards.

Each process holds one shard of scikit-learn's digits (bundled with it: nothing is downloaded)
and every curvops builder gets only its own shard; every rank then holds the operator of
the union of the shards, the same as one process on all the data. Run it on two processes
(gloo on CPUs; NCCL with one GPU per process where CUDA is available)::

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29512 examples/distributed_kfac.py

or on one, without a process group (everything stays in the process)::

    python examples/distributed_kfac.py

``--epochs``, ``--steps`` (per epoch), ``--examples`` and ``--batch-size`` make it smaller.

It prints, on rank 0:

(a) ``curvops.KFAC`` and ``curvops.EKFAC`` of an MLP over the shards: logdet, trace, the
    seconds each build took, and how far each is from the same operator built by this
    process alone on all the data (``group="local"``);
(b) the MLP trained in ``DistributedDataParallel`` with ``curvops.optim.KFACOptimizer``:
    the mean training loss and the test accuracy after every epoch;
(c) a Laplace approximation of the trained MLP over the shards: its log marginal likelihood
    at the tuned prior precision, against one process on all the data;
(d) the training examples of the highest self-influence (EKFAC, over the shards), against
    one process on all the data.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import curvops
from curvops.distributed import Shards

Batches = list[tuple[Tensor, Tensor]]


class Shard(DistributedSampler):
    """This rank's examples, ``rank, rank + size, ...``: a :class:`DistributedSampler` without the
    repeated examples it pads the last shards with, so the shards' union is the data set, each
    example once (the shards may differ in size by one)."""

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[: len(self)])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def start() -> tuple[Shards, torch.device]:
    """Join the process group ``torchrun`` describes (NCCL and this rank's GPU where CUDA is
    available, gloo on the CPU otherwise); without ``torchrun``, this process alone."""
    if "LOCAL_RANK" not in os.environ:
        return Shards.of(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Shards.of(), device


def digits(examples: int | None) -> tuple[TensorDataset, TensorDataset]:
    """Flattened 8x8 digit images (float64, standardised) and labels: a fixed stratified 80/20
    split; the first ``examples`` training examples if given."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return TensorDataset(x_train[:examples], y_train[:examples]), TensorDataset(x_test, y_test)


def shard_batches(data: TensorDataset, shards: Shards, batch_size: int, device: torch.device) -> Batches:
    """This rank's shard of ``data`` in batches, on ``device``: the ``data`` a builder takes."""
    sampler = Shard(data, num_replicas=shards.size, rank=shards.rank, shuffle=False)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    return [(x.to(device), y.to(device)) for x, y in loader]


def make_model(device: torch.device) -> nn.Module:
    """A 64-32-10 tanh MLP, the same on every rank (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double().to(device)


def timed(
    shards: Shards, build: Callable[[], curvops.CurvatureOperator]
) -> tuple[curvops.CurvatureOperator, float]:
    """``build()`` and its seconds, from a common start on every rank."""
    if shards.active:
        dist.barrier()
    begin = time.perf_counter()
    return build(), time.perf_counter() - begin


def distance(op: curvops.CurvatureOperator, truth: curvops.CurvatureOperator) -> float:
    """``max |(op - truth) V| / max |truth V|`` for eight fixed random columns ``V``."""
    columns = torch.randn(truth.shape[0], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    columns = columns.to(truth.device)
    expected = truth @ columns
    return ((op @ columns - expected).abs().max() / expected.abs().max()).item()


def operators(
    model: nn.Module, shards: Shards, batches: Batches, everything: Batches, damping: float
) -> None:
    """(a) KFAC and EKFAC over the shards; on rank 0 against one process on all the data."""
    loss_fn = nn.CrossEntropyLoss()
    size = sum(p.numel() for p in model.parameters())
    say(shards, f"(a) curvature of a {size}-parameter MLP over {shards.size} shard(s), fisher_type='type-2'")
    for name, builder in (("KFAC", curvops.KFAC), ("EKFAC", curvops.EKFAC)):
        builder(model, loss_fn, everything[:1], fisher_type="type-2", group="local")  # warm-up, untimed
        op, seconds = timed(shards, lambda b=builder: b(model, loss_fn, batches, fisher_type="type-2"))
        logdet, trace = op.logdet(damping).item(), op.trace().item()
        say(
            shards, f"{name:>5}: logdet(F + {damping:g} I) {logdet:.10f}  trace {trace:.10f}  {seconds:.3f} s"
        )
        if shards.rank == 0 and shards.active:
            one, alone = timed(
                Shards.of("local"),
                lambda b=builder: b(model, loss_fn, everything, fisher_type="type-2", group="local"),
            )
            difference = distance(op, one)
            say(
                shards,
                f"{'':>5}  one process on all the data: {alone:.3f} s, relative difference {difference:.1e}",
            )


def train(
    model: nn.Module,
    shards: Shards,
    device: torch.device,
    data: TensorDataset,
    test: TensorDataset,
    args: argparse.Namespace,
) -> None:
    """(b) The MLP in DistributedDataParallel with KFACOptimizer: each rank takes ``1/size`` of
    every global batch (the ranks' parts of a batch are one process's batch, but for the
    examples ``DistributedSampler`` repeats in the last one), and the steps are those of one
    process on the global batches; the loss is the mean over all ranks' examples."""
    ddp = parallel(model, shards, device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = curvops.optim.KFACOptimizer(  # type-2: no random labels, the steps of one process
        ddp,
        loss_fn,
        lr=0.05,
        momentum=0.9,
        damping=0.1,
        kl_clip=1e-3,
        T_stats=5,
        T_inv=20,
        fisher_type="type-2",
    )
    sampler = DistributedSampler(data, num_replicas=shards.size, rank=shards.rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=max(args.batch_size // shards.size, 1), sampler=sampler)
    where = "DistributedDataParallel" if shards.active else "one process"
    say(shards, f"(b) KFACOptimizer on {where}, global batch {args.batch_size}")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for step, (x, y) in enumerate(loader):
            if args.steps is not None and step >= args.steps:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(ddp(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        total, count = shards.sum_numbers([total, count], device)
        correct = accuracy(model, test, device)
        say(shards, f"epoch {epoch + 1}: training loss {total / count:.6f}  test accuracy {correct:.4f}")


def parallel(model: nn.Module, shards: Shards, device: torch.device) -> nn.Module:
    """``model`` in :class:`DistributedDataParallel` over the shards' ranks (alone: itself)."""
    if not shards.active:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def accuracy(model: nn.Module, test: TensorDataset, device: torch.device) -> float:
    """The fraction of the test set the model classifies correctly."""
    x, y = (t.to(device) for t in test.tensors)
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).double().mean().item()


def laplace(model: nn.Module, shards: Shards, batches: Batches, everything: Batches) -> None:
    """(c) A KFAC Laplace approximation over the shards, its prior precision tuned by the
    log marginal likelihood; on rank 0 against one process on all the data."""
    loss_fn = nn.CrossEntropyLoss()
    la = curvops.laplace.Laplace(model, loss_fn, batches, curvature="kfac", prior_precision=1.0)
    tau = la.optimize_prior_precision().item()
    marglik = la.log_marginal_likelihood().item()
    say(shards, f"(c) Laplace over {shards.size} shard(s): N = {la.num_terms:.0f}, prior precision {tau:.6f}")
    say(shards, f"    log marginal likelihood {marglik:.8f}")
    if shards.rank == 0 and shards.active:
        one = curvops.laplace.Laplace(
            model, loss_fn, everything, curvature="kfac", prior_precision=tau, group="local"
        )
        marglik = one.log_marginal_likelihood().item()
        say(shards, f"    one process on all the data: log marginal likelihood {marglik:.8f}")


def influence(
    model: nn.Module, shards: Shards, data: TensorDataset, batches: Batches, everything: Batches
) -> None:
    """(d) The most self-influential training examples over the shards (EKFAC): each rank scores
    its own examples against the union's curvature; on rank 0 against one process."""
    loss_fn = nn.CrossEntropyLoss()
    scores = curvops.influence.self_influence(model, loss_fn, batches, curvature="ekfac", damping=1e-3)
    top = curvops.influence.top_influences(scores, k=3)  # indices of the union, rank after rank
    order = union_order(data, shards)
    examples = [order[i] for i in top.helpful.tolist()]
    say(shards, f"(d) the most self-influential training examples over {shards.size} shard(s): {examples}")
    if shards.rank == 0 and shards.active:
        alone = curvops.influence.self_influence(
            model, loss_fn, everything, curvature="ekfac", damping=1e-3, group="local"
        )
        examples = curvops.influence.top_influences(alone, k=3, group="local").helpful.tolist()
        say(shards, f"    one process on all the data: {examples}")


def union_order(data: TensorDataset, shards: Shards) -> list[int]:
    """The data set's index of every example of the union, numbered rank after rank (as the
    influence functions number them over shards)."""
    return [
        i
        for rank in range(shards.size)
        for i in Shard(data, num_replicas=shards.size, rank=rank, shuffle=False)
    ]


def say(shards: Shards, text: str) -> None:
    """Print ``text`` on rank 0 (the other ranks print nothing)."""
    if shards.rank == 0:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch (split over the ranks)")
    parser.add_argument("--examples", type=int, default=None, help="the first N training examples only")
    parser.add_argument("--damping", type=float, default=1e-3, help="the damping of the logdet in (a)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shards, device = start()
    try:
        train_data, test_data = digits(args.examples)
        batches = shard_batches(train_data, shards, 256, device)
        everything = shard_batches(train_data, Shards.of("local"), 256, device)
        model = make_model(device)
        operators(model, shards, batches, everything, args.damping)
        train(model, shards, device, train_data, test_data, args)
        laplace(model, shards, batches, everything)
        influence(model.eval(), shards, train_data, batches, everything)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
