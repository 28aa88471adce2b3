"""curvops beside curvlinops, and beside the floor of a KFAC statistics pass, in one process.

Workloads (random data, float32, cross-entropy, batches of 256):

- ``mlp``: MLP 784-1024-1024-10 (ReLU), 4096 examples;
- ``cnn``: Conv(3→16)-ReLU-MaxPool-Conv(16→32)-ReLU-MaxPool-Linear(2048→128)-ReLU-Linear(128→10)
  on 3x32x32 images, 1024 of them;
- ``tokens``: Linear(256→256)-ReLU-Linear(256→10) on 256 sequences of 64 positions (weight
  sharing over the positions; the loss averages over every token).

Each timed step is the median of three runs, on the same data and model, alternating the two
libraries: KFAC's statistics (``fisher_type="mc"``, one sample, separate biases, expand),
EKFAC end to end (statistics, eigendecompositions, the correction pass, one product), one
``GGN @ v`` over the data, and KFAC's exactly damped inverse (``(F + 1e-3 I)^{-1}``: its
eigendecompositions and one product, then one more product). curvlinops runs with its default
options but ``check_deterministic=False`` (curvops does not check by default either) and
``use_exact_damping=True`` for the inverse (curvops's inverse is exact).

The **floor** of the statistics pass is printed beside it: a forward pass (with the graph
kept), the backward pass from the sampled loss to the layer outputs only (no weight
gradients), and the factor products ``Σ a aᵀ``, ``Σ g gᵀ`` alone on already extracted inputs
(unfolded patches for a convolution) and output gradients; no statistics pass can cost less.

``--save FILE`` writes the curvops operators of the ``mlp``/``cnn``/``tokens`` workloads in
float64 (KFAC, EKFAC: their products with fixed probes) and ``--compare FILE`` prints the
largest relative difference to a saved file: run ``--save`` on the code before a change and
``--compare`` after it to see that the results did not move.

curvlinops is an optional extra: ``pip install -e ".[bench]"``, then
``pip install --no-deps curvlinops-for-pytorch==3.0.1`` (so the pinned torch stays; its
``einconv`` and ``linear_operator`` come with the extra). Without it only curvops and the floor
are printed.

Usage: ``python benchmarks/peers.py [--device cuda] [--workloads mlp cnn tokens] [--quick]
[--save FILE | --compare FILE]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
from collections.abc import Callable

import torch
from common import device_name, timed, workload
from torch import Tensor, nn

import curvops

try:
    import curvlinops
except ImportError:  # the optional [bench] extra
    curvlinops = None

SIZES = {"mlp": 4096, "cnn": 1024, "tokens": 256}
BATCH = 256
DAMPING = 1e-3
SAME_STEP = {"  with float32 eigh": "KFAC inverse, first @ v"}
"""curvlinops's step that a curvops variant is compared with (curvlinops decomposes in float32)."""


def make_workload(name: str, examples: int, batch: int, device: torch.device, dtype: torch.dtype):
    """A model and its ``(X, y)`` batches, seeded: ``benchmarks/common.py``'s MLP and token model,
    and its CNN with a hidden linear layer of 128 more (``Linear(2048→128)-ReLU-Linear(128→10)``)."""
    if name != "cnn":
        model, data = workload(name, examples, batch, device)
        return model.to(dtype), [(x.to(dtype), y) for x, y in data]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    x, y = torch.randn(examples, 3, 32, 32), torch.randint(0, 10, (examples,))
    batches = zip(x.split(batch), y.split(batch), strict=True)
    return model.to(device, dtype), [(xb.to(device, dtype), yb.to(device)) for xb, yb in batches]


class Flat(nn.Module):
    """The token model with outputs ``[N·S, C]`` and targets ``[N·S]``: how curvlinops's EKFAC
    takes a sequence model (it refuses outputs of more than 2 axes). With ``fisher_type="mc"``
    its estimator is the same as for ``[N, C, S]`` outputs (labels drawn per position)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).transpose(1, 2).flatten(0, 1)


class Floor:
    """The least a KFAC statistics pass costs: forward, backward to the layer outputs, products."""

    def __init__(self, model: nn.Module, data: list) -> None:
        self.model, self.data = model, data
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def forward(self) -> None:
        with torch.enable_grad():
            for x, _ in self.data:
                self.model(x)

    def _captured(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        inputs, outputs = [], []

        def hook(module, args, output):
            inputs.append(args[0].detach())
            outputs.append(output)

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        try:
            output = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return output, inputs, outputs

    def forward_backward(self) -> None:
        """Forward, then ``autograd.grad`` of an MC-sampled loss to the layer outputs."""
        for x, _ in self.data:
            output, _, outputs = self._captured(x)
            logits = output.detach().transpose(1, -1) if output.ndim > 2 else output.detach()
            labels = torch.distributions.Categorical(logits=logits).sample()
            labels = labels.transpose(1, -1) if output.ndim > 2 else labels
            loss = nn.functional.cross_entropy(output, labels, reduction="sum")
            torch.autograd.grad(loss, outputs)

    def operands(self) -> list[tuple[Tensor, Tensor]]:
        """Every batch's and layer's ``(a, g)`` as rows ``[M, n]`` (patches unfolded)."""
        pairs = []
        for x, _ in self.data:
            output, inputs, outputs = self._captured(x)
            loss = nn.functional.cross_entropy(output, output.detach().argmax(1), reduction="sum")
            gradients = torch.autograd.grad(loss, outputs)
            for layer, a, g in zip(self.layers, inputs, gradients, strict=True):
                if isinstance(layer, nn.Conv2d):
                    a = nn.functional.unfold(a, layer.kernel_size, padding=layer.padding).transpose(1, 2)
                    g = g.flatten(2).transpose(1, 2)
                rows = a.reshape(-1, a.shape[-1]).contiguous(), g.reshape(-1, g.shape[-1]).contiguous()
                pairs.append(rows)
        return pairs


def products(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for a, g in pairs:
        a.T @ a
        g.T @ g


def probes(operator, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(operator.shape[0], 4, generator=generator, dtype=torch.float64)


def save_or_compare(names: list[str], device: torch.device, save: str | None, compare: str | None) -> None:
    """The float64 curvops KFAC and EKFAC products with fixed probes, saved or compared."""
    results = {}
    for name in names:
        model, data = make_workload(name, 64, 32, device, torch.float64)
        loss_fn = nn.CrossEntropyLoss()
        for kind, build in (("kfac", curvops.KFAC), ("ekfac", curvops.EKFAC)):
            operator = build(model, loss_fn, data)
            v = probes(operator).to(device)
            results[f"{name}/{kind}"] = (operator @ v).cpu()
            results[f"{name}/{kind}/inverse"] = (operator.inverse(DAMPING) @ v).cpu()
    if save:
        torch.save(results, save)
        print(f"saved {len(results)} float64 products to {save}")
    if compare:
        before = torch.load(compare, weights_only=True)
        print("largest relative difference to the saved products (float64):")
        for key, value in results.items():
            if key in before:
                difference = (value - before[key]).abs().max() / before[key].abs().max()
                print(f"  {key:<22} {float(difference):.2e}")


def curvlinops_steps(model: nn.Module, data: list, v: Tensor, name: str) -> dict[str, Callable[[], object]]:
    """curvlinops's version of each step (``{}`` without it). Token models go in as :class:`Flat`."""
    if curvlinops is None:
        return {}
    if name == "tokens":
        model, data = Flat(model), [(x, y.flatten()) for x, y in data]
    loss_fn, params = nn.CrossEntropyLoss(), [p for p in model.parameters() if p.requires_grad]
    options = {"check_deterministic": False}

    def kfac():
        operator = curvlinops.KFACLinearOperator(model, loss_fn, params, data, **options)
        operator.compute_kronecker_factors()
        return operator

    def ekfac():
        return curvlinops.EKFACLinearOperator(model, loss_fn, params, data, **options) @ v

    def ggn():
        return curvlinops.GGNLinearOperator(model, loss_fn, params, data, **options) @ v

    built = kfac()

    def first_inverse():
        return curvlinops.KFACInverseLinearOperator(built, damping=DAMPING, use_exact_damping=True) @ v

    inverse = curvlinops.KFACInverseLinearOperator(built, damping=DAMPING, use_exact_damping=True)
    inverse @ v
    return {
        "KFAC build": kfac,
        "EKFAC end to end": ekfac,
        "GGN @ v": ggn,
        "KFAC inverse, first @ v": first_inverse,
        "KFAC inverse @ v": lambda: inverse @ v,
    }


def agreement(name: str, device: torch.device) -> str:
    """The largest relative difference of curvops's and curvlinops's type-2 KFAC and GGN products
    with two probes on 64 examples of the workload, in float64."""
    model, data = make_workload(name, 64, 32, device, torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    theirs_model, theirs_data = (
        (Flat(model), [(x, y.flatten()) for x, y in data]) if name == "tokens" else (model, data)
    )
    params = list(model.parameters())
    options = {"check_deterministic": False}
    pairs = [
        (
            curvops.KFAC(model, loss_fn, data, fisher_type="type-2"),
            curvlinops.KFACLinearOperator(
                theirs_model, loss_fn, params, theirs_data, fisher_type="type-2", **options
            ),
        ),
        (
            curvops.GGN(model, loss_fn, data),
            curvlinops.GGNLinearOperator(theirs_model, loss_fn, params, theirs_data, **options),
        ),
    ]
    differences = []
    for ours, theirs in pairs:
        v = probes(ours, 2).to(device)
        mine, peer = ours @ v, theirs @ v
        differences.append(float((mine - peer).abs().max() / peer.abs().max()))
    return f"KFAC {differences[0]:.1e}, GGN {differences[1]:.1e}"


def eigh_precision(narrow, kfac, v: Tensor) -> str:
    """How far the KFAC inverse and logdet with ``decomposition_dtype=torch.float32`` (``narrow``)
    are from the default float64 decompositions' (``kfac``)."""
    mine, truth = narrow.inverse(DAMPING) @ v, kfac.inverse(DAMPING) @ v
    inverse = float((mine - truth).norm() / truth.norm())
    logdet = abs(float(narrow.logdet(DAMPING) - kfac.logdet(DAMPING)) / float(kfac.logdet(DAMPING)))
    return f"inverse @ v {inverse:.1e}, logdet {logdet:.1e}"


def report(name: str, examples: int, device: torch.device, runs: int) -> None:
    """Time one workload in both libraries, and the floor, and print the ratios."""
    model, data = make_workload(name, examples, min(BATCH, examples), device, torch.float32)
    loss_fn = nn.CrossEntropyLoss()
    floor = Floor(model, data)
    pairs = floor.operands()

    def reference() -> None:
        for x, y in data:
            loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    kfac = curvops.KFAC(model, loss_fn, data)
    narrow = curvops.KFAC(model, loss_fn, data, decomposition_dtype=torch.float32)
    v = torch.randn(kfac.shape[0], device=device)
    state, narrow_state = kfac.state_dict(), narrow.state_dict()
    inverse = kfac.inverse(DAMPING)
    ours: dict[str, Callable[[], object]] = {
        "KFAC build": lambda: curvops.KFAC(model, loss_fn, data),
        "EKFAC end to end": lambda: curvops.EKFAC(model, loss_fn, data) @ v,
        "GGN @ v": lambda: curvops.GGN(model, loss_fn, data) @ v,
        "KFAC inverse, first @ v": lambda: curvops.from_state_dict(state).inverse(DAMPING) @ v,
        "  with float32 eigh": lambda: curvops.from_state_dict(narrow_state).inverse(DAMPING) @ v,
        "KFAC inverse @ v": lambda: inverse @ v,
    }
    theirs = curvlinops_steps(model, data, v, name)
    floor_parts = {
        "forward+backward": reference,
        "forward": floor.forward,
        "forward, backward to the outputs": floor.forward_backward,
        "products": lambda: products(pairs),
    }
    times: dict[str, list[float]] = {}
    for function in [*floor_parts.values(), *ours.values(), *theirs.values()]:
        function()  # warm up
    for _ in range(runs):  # round-robin, so that every step sees the same machine
        for label, function in floor_parts.items():
            times.setdefault(label, []).append(timed(function))
        for label, function in ours.items():
            times.setdefault(label, []).append(timed(function))
            if label in theirs:
                times.setdefault("curvlinops " + label, []).append(timed(theirs[label]))
    median = {label: statistics.median(values) for label, values in times.items()}
    forward, fwd_bwd = median["forward"], median["forward+backward"]
    backward = median["forward, backward to the outputs"] - forward
    floor_total = median["forward, backward to the outputs"] + median["products"]
    print(f"{name}: D = {kfac.shape[0]:,}, {examples} examples; forward+backward {1e3 * fwd_bwd:.1f} ms")
    print(
        f"  floor of the statistics pass: {1e3 * floor_total:.1f} ms = forward {1e3 * forward:.1f} "
        f"+ backward to the layer outputs {1e3 * backward:.1f} "
        f"+ factor products {1e3 * median['products']:.1f}"
    )
    if curvlinops is not None:
        print(f"  curvops vs curvlinops, type-2, float64, relative: {agreement(name, device)}")
    precision = eigh_precision(narrow, kfac, v)
    print(f"  KFAC with float32 eigh against float64 (the default), relative: {precision}")
    print(f"  {'step':<24} {'curvops':>10} {'curvlinops':>11} {'ratio':>7} {'/fwd+bwd':>9} {'/floor':>7}")
    for label in ours:
        mine = median[label]
        peer = median.get("curvlinops " + SAME_STEP.get(label, label))
        peer_text = "-" if peer is None else f"{1e3 * peer:.1f}"
        ratio_text = "-" if peer is None else f"{mine / peer:.2f}x"
        floor_text = f"{mine / floor_total:6.2f}x" if label == "KFAC build" else ""
        print(
            f"  {label:<24} {1e3 * mine:>10.1f} {peer_text:>11} {ratio_text:>7} "
            f"{mine / fwd_bwd:>8.2f}x {floor_text}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="64 examples, one run: checks the script runs")
    parser.add_argument("--save", help="save the float64 curvops products here")
    parser.add_argument("--compare", help="compare the float64 curvops products to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.save or args.compare:
        save_or_compare(args.workloads, device, args.save, args.compare)
        return
    runs = 1 if args.quick else 3
    peer = "no curvlinops (the [bench] extra)"
    if curvlinops is not None:
        peer = "curvlinops " + importlib.metadata.version("curvlinops-for-pytorch")
    print(f"curvops {curvops.__version__} beside {peer} on {device_name(device)}, float32, median of {runs}")
    print("times in ms; ratio = curvops / curvlinops\n")
    for name in args.workloads:
        report(name, 64 if args.quick else SIZES[name], device, runs)


if __name__ == "__main__":
    main()
