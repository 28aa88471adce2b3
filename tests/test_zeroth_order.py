"""ZerothOrderOptimizer: its estimates against the true derivative and curvature, training,
state dicts, memory against the model size, and bad input."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DOUBLE, generator, random_psd
from torch import nn

from curvops.errors import StateDictError
from curvops.optim import ZerothOrderOptimizer


class Quadratic(nn.Module):
    """``½ θ^T H θ + b^T θ`` over two parameter tensors (two "layers")."""

    def __init__(self, hessian: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.hessian, self.shift = hessian, shift
        self.first = nn.Parameter(torch.randn(4, generator=generator(1), dtype=DOUBLE))
        self.second = nn.Parameter(torch.randn(2, 3, generator=generator(2), dtype=DOUBLE))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.first.reshape(-1), self.second.reshape(-1)])

    def forward(self) -> torch.Tensor:
        theta = self.flat()
        return 0.5 * theta @ self.hessian @ theta + self.shift @ theta


def quadratic(isotropic: bool = False) -> Quadratic:
    hessian = 3.0 * torch.eye(10, dtype=DOUBLE) if isotropic else random_psd(10, seed=4)
    return Quadratic(hessian, torch.randn(10, generator=generator(5), dtype=DOUBLE))


def test_estimates_are_the_directional_derivative_and_curvature_of_a_quadratic():
    model = quadratic()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.0, epsilon=1e-3)
    for step in range(3):
        theta = model.flat().detach().clone()
        z = torch.cat([opt.direction(step, i).reshape(-1) for i in range(2)])
        opt.step(model)
        derivative, curvature = opt.last_estimates
        assert set(z.abs().tolist()) == {1.0}
        assert derivative == pytest.approx(float(z @ (model.hessian @ theta + model.shift)), rel=1e-8)
        assert curvature == pytest.approx(float(z @ model.hessian @ z), rel=1e-6)


def test_curvature_estimate_converges_as_epsilon_shrinks():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, dtype=DOUBLE))

    def loss() -> torch.Tensor:
        return (weight**4).sum() + weight.sum() ** 2

    errors = []
    for epsilon in (1e-1, 1e-2, 1e-3):
        opt = ZerothOrderOptimizer([weight], lr=0.0, epsilon=epsilon)
        z = opt.direction(0, 0)
        hessian = torch.func.hessian(lambda w: (w**4).sum() + w.sum() ** 2)(weight.detach())
        opt.step(loss)
        errors.append(abs(opt.last_estimates[1] - float(z @ hessian @ z)))
    assert errors[1] < 0.02 * errors[0] and errors[2] < 0.02 * errors[1]  # O(ε²)


def test_isotropic_curvature_average_is_exact():
    model = quadratic(isotropic=True)
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.0, betas=(0.9, 0.5))
    for _ in range(4):
        opt.step(model)
    assert opt.curvature / (1 - 0.5**4) == pytest.approx(3.0, rel=1e-6)  # |c| / D = h for H = hI


def test_training_reduces_the_loss():
    model = quadratic()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.05, epsilon=1e-3)
    start = float(model().detach())
    minimum = float(-0.5 * model.shift @ torch.linalg.solve(model.hessian, model.shift))
    for _ in range(1000):
        opt.step(model)
    assert float(model().detach()) - minimum < 0.05 * (start - minimum)


def test_regression_model_trains(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
    x = torch.randn(128, 5, device=device)
    y = x[:, :1] - 0.5 * x[:, 1:2]
    loss_fn = nn.MSELoss()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.01)
    start = float(loss_fn(model(x), y).detach())
    for _ in range(300):
        opt.step(lambda: loss_fn(model(x), y))
    assert float(loss_fn(model(x), y).detach()) < 0.5 * start


def test_state_dict_round_trip():
    model = quadratic()
    options = {"lr": 0.05}
    opt = ZerothOrderOptimizer(model.parameters(), **options)
    for _ in range(3):
        opt.step(model)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(5):
        opt.step(model)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = quadratic()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = ZerothOrderOptimizer(resumed.parameters(), **options)
    resumed_opt.load_state_dict(checkpoint["opt"])
    for _ in range(5):
        resumed_opt.step(resumed)
    assert torch.equal(model.flat(), resumed.flat())
    with pytest.raises(StateDictError, match="zeroth_order"):
        resumed_opt.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=1).state_dict())


def test_nonfinite_loss_skips_the_step():
    model = quadratic()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.1)
    before = model.flat().detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: torch.tensor(float("nan")))
    torch.testing.assert_close(model.flat(), before, rtol=0, atol=1e-15)
    assert opt.steps == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"eps": -1.0}, "eps"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(options, match):
    with pytest.raises(ValueError, match=match):
        ZerothOrderOptimizer(quadratic().parameters(), **options)


PEAK_MEMORY = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from curvops.optim import ZerothOrderOptimizer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loss_fn = nn.MSELoss()

    def peak():  # VmHWM: this process's peak resident memory (ru_maxrss survives exec)
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    def mlp(width):
        return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                             nn.Linear(width, width))

    def train(model, x, y):
        if sys.argv[1] == "zo":
            opt = ZerothOrderOptimizer(model.parameters(), lr=1e-3)
            for _ in range(3):
                opt.step(lambda: loss_fn(model(x), y))
        else:
            opt = torch.optim.Adam(model.parameters())
            for _ in range(3):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

    train(mlp(8), torch.randn(4, 8), torch.randn(4, 8))  # first use of every kernel, at no size
    model = mlp(2048)
    x, y = torch.randn(32, 2048), torch.randn(32, 2048)
    with torch.no_grad():
        for _ in range(3):
            loss_fn(model(x), y)
    inference = peak()
    train(model, x, y)
    print(peak() - inference)
    """
)


def peak_growth(mode: str) -> int:
    """Bytes by which the peak resident memory grows beyond inference, in a fresh process."""
    # a fixed mmap threshold: large blocks are mapped and unmapped at once, so the resident
    # peak does not depend on glibc's adaptive threshold (which follows the allocation history)
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**17)}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, mode],
        capture_output=True, text=True, check=True, timeout=120, env=environment,
    )  # fmt: skip
    return int(result.stdout.strip())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
def test_peak_memory_is_inference_plus_the_optimizer_state():
    parameters = 3 * (2048 * 2048 + 2048) * 4  # bytes, float32
    largest = (2048 * 2048 + 2048) * 4
    zeroth_order = peak_growth("zo")
    # the state g (one copy of the parameters) and one regenerated direction at a time
    bound = parameters + largest + 16 * 2**20  # storing z would add 48 MiB
    assert zeroth_order <= bound, f"peak grew {zeroth_order / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    assert peak_growth("adam") > 2 * parameters  # backpropagation with Adam, for scale
