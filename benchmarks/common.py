"""What the benchmark scripts share: timing, workloads and the forward+backward reference."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.benchmark import Timer


def seconds(function, min_run_time: float) -> float:
    """Median seconds of ``function()`` (torch.utils.benchmark; synchronises CUDA)."""
    timer = Timer(stmt="function()", globals={"function": function})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def timed(function) -> float:
    """Seconds of one call of ``function()`` (synchronising CUDA), for calls too long to repeat."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


class TokenModel(nn.Module):
    """Linear(256→256)-ReLU-Linear(256→10) on ``[N, 64, 256]`` tokens; output ``[N, 10, 64]``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))).transpose(1, 2)


WORKLOADS = ("mlp", "cnn", "tokens")


def workload(name: str, examples: int, batch: int, device: torch.device) -> tuple[nn.Module, list]:
    """A model and ``(X, y)`` batches of random data with 10 classes.

    ``mlp``: MLP 784-1024-1024-10 (ReLU); ``cnn``: Conv(3→16)-ReLU-MaxPool-Conv(16→32)-ReLU-
    MaxPool-Linear(2048→10) on 32x32 RGB images; ``tokens``: :class:`TokenModel`.
    """
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        x, y = torch.randn(examples, 784), torch.randint(0, 10, (examples,))
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
        )  # fmt: skip
        x, y = torch.randn(examples, 3, 32, 32), torch.randint(0, 10, (examples,))
    else:
        model = TokenModel()
        x, y = torch.randn(examples, 64, 256), torch.randint(0, 10, (examples, 64))
    data = [(xb.to(device), yb.to(device)) for xb, yb in zip(x.split(batch), y.split(batch), strict=True)]
    return model.to(device), data


def forward_backward(model: nn.Module, loss_fn: nn.Module, data: list) -> None:
    """The reference: one plain forward and backward pass over every batch."""
    for x, y in data:
        loss_fn(model(x), y).backward()


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


def run(
    description: str,
    title: str,
    report: Callable[..., None],
    workloads: tuple[str, ...] = WORKLOADS,
    options: dict[str, dict] | None = None,
) -> None:
    """Parse ``--device``, ``--workloads``, ``--quick`` and the script's own ``options`` (name to
    ``add_argument`` keywords, passed on to ``report`` by name), print the header, and
    ``report(name, examples, batch, device, min_run_time, **options)`` for each workload."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=list(workloads), choices=WORKLOADS)
    parser.add_argument("--quick", action="store_true", help="64 examples: checks the script runs")
    for name, keywords in (options or {}).items():
        parser.add_argument(f"--{name}", **keywords)
    args = parser.parse_args()
    extra = {name: getattr(args, name) for name in options or {}}
    device = torch.device(args.device)
    examples, batch, min_run_time = (64, 32, 0.01) if args.quick else (4096, 512, 1.0)
    print(f"{title} on {device_name(device)}, float32, {examples} examples in batches of {batch}")
    print("times in ms; (x) = ratio to one forward+backward pass over the same data\n")
    for name in args.workloads:
        report(name, examples, batch, device, min_run_time, **extra)
