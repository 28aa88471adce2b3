"""Train an MLP and a small CNN on scikit-learn's digits with six optimizers for the same
wall-clock budget: SGD with momentum, Adam, KFAC, EKFAC, TKFAC and the zeroth-order method.

Prints test accuracy per optimizer and plots it against epochs and against seconds::

    python examples/train_digits.py --budget 3 --seeds 5 --plot digits.png

Timing counts training only (the per-epoch evaluation is excluded). The data ships with
scikit-learn (1797 8x8 images); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import curvops

OPTIMIZERS = ("sgd", "adam", "kfac", "ekfac", "tkfac", "zeroth-order")
MODELS = ("mlp", "cnn")


@dataclass
class Split:
    """Standardised digit images ``[N, 1, 8, 8]`` and labels, for training and testing."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class History:
    """Test accuracy after each epoch, with the training seconds spent so far."""

    optimizer: str
    model: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def load_split() -> Split:
    """Digits, 20% held out for testing (a fixed stratified split), standardised with the
    training statistics."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return Split((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """``"mlp"``: 64-64-10 with tanh; ``"cnn"``: two 3x3 convolutions and a linear read-out."""
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )  # fmt: skip


def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``name`` with settings that work on both models here."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=3e-3)
    if name == "zeroth-order":
        return curvops.optim.ZerothOrderOptimizer(model.parameters(), lr=5e-4, epsilon=1e-3)
    return curvops.optim.KFACOptimizer(
        model, loss_fn, curvature=name, lr=0.05, momentum=0.9, damping=0.1, kl_clip=1e-3, T_stats=5, T_inv=20
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The fraction of correctly classified examples."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(
    model_name: str,
    optimizer_name: str,
    split: Split,
    budget: float,
    batch_size: int = 64,
    seed: int = 0,
    max_epochs: int | None = None,
) -> History:
    """Train until ``budget`` seconds of training (or ``max_epochs``) have passed."""
    model = make_model(model_name, seed)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = make_optimizer(optimizer_name, model, loss_fn)
    step = _zeroth_order_step if optimizer_name == "zeroth-order" else _gradient_step
    history = History(optimizer_name, model_name, seed)
    generator = torch.Generator().manual_seed(seed)
    elapsed, epoch = 0.0, 0
    while elapsed < budget and (max_epochs is None or epoch < max_epochs):
        start = time.perf_counter()
        order = torch.randperm(len(split.y_train), generator=generator)
        for batch in order.split(batch_size):
            step(model, loss_fn, optimizer, split.x_train[batch], split.y_train[batch])
        elapsed += time.perf_counter() - start
        epoch += 1
        history.epochs.append(epoch)
        history.seconds.append(elapsed)
        history.accuracy.append(accuracy(model, split.x_test, split.y_test))
    return history


def _gradient_step(model, loss_fn, optimizer, x, y) -> None:
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()


def _zeroth_order_step(model, loss_fn, optimizer, x, y) -> None:
    optimizer.step(lambda: loss_fn(model(x), y))


def run(
    models: tuple[str, ...] = MODELS,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    budget: float = 3.0,
    seeds: int = 1,
    max_epochs: int | None = None,
    report: Callable[[str], None] = print,
) -> list[History]:
    """Every optimizer on every model for the same budget, for seeds ``0 .. seeds - 1`` (the
    initialisation and batch order; the split stays fixed); one line of means per pair."""
    split = load_split()
    histories = []
    report(f"{'model':<5} {'optimizer':<13} {'epochs':>7} {'final test acc':>16} {'best test acc':>14}")
    for model_name in models:
        for optimizer_name in optimizers:
            runs = [
                train(model_name, optimizer_name, split, budget, seed=seed, max_epochs=max_epochs)
                for seed in range(seeds)
            ]
            histories += runs
            final = torch.tensor([h.accuracy[-1] for h in runs])
            best = torch.tensor([max(h.accuracy) for h in runs])
            epochs = sum(h.epochs[-1] for h in runs) / seeds
            spread = f" ± {final.std():.4f}" if seeds > 1 else ""
            report(
                f"{model_name:<5} {optimizer_name:<13} {epochs:>7.0f} {final.mean():>7.4f}{spread:<9} "
                f"{best.mean():>14.4f}"
            )
    return histories


def plot(histories: list[History]) -> Figure:
    """Test accuracy against epochs and against seconds, one row per model (seed 0)."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(h.model for h in histories))
    figure, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model_name in enumerate(models):
        for h in (h for h in histories if h.model == model_name and h.seed == 0):
            axes[row, 0].plot(h.epochs, h.accuracy, label=h.optimizer)
            axes[row, 1].plot(h.seconds, h.accuracy, label=h.optimizer)
        for column, label in enumerate(("epoch", "training seconds")):
            axes[row, column].set(xlabel=label, ylabel="test accuracy", title=model_name, ylim=(0.0, 1.0))
            axes[row, column].grid(alpha=0.3)
        axes[row, 1].legend(loc="lower right")
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> list[History]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=3.0, help="training seconds per optimizer and model")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0 .. N-1 and report means")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--max-epochs", type=int, default=None, help="stop earlier after this many epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small models run best on one)")
    parser.add_argument("--plot", default=None, help="save the accuracy plots to this PNG file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    histories = run(tuple(args.models), tuple(args.optimizers), args.budget, args.seeds, args.max_epochs)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        plot(histories).savefig(args.plot, dpi=100)
        print(f"plots written to {args.plot}")
    return histories


if __name__ == "__main__":
    main()
