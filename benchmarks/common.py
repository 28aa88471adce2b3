"""What the benchmark scripts share: timing, workloads and the forward+backward reference."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.benchmark import Timer


def seconds(function, min_run_time: float) -> float:
    """Median seconds of ``function()`` (torch.utils.benchmark; synchronises CUDA)."""
    timer = Timer(stmt="function()", globals={"function": function})
    return timer.blocked_autorange(min_run_time=min_run_time).median


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
