"""Last-layer Laplace: ``params="last_layer"`` (the last layer fitted on its features, computed
once) against ``params=[W, b]`` on the whole network, in one run.

Workload: the CNN of ``benchmarks/peers.py`` (Conv(3→16)-Conv(16→32)-Linear(2048→128)-Linear(128→10),
ReLU and max-pooling) on 1024 random images of 3x32x32 with 10 classes, float32, batches of 256,
cross-entropy; the posterior over the last layer's 1,290 parameters. For each curvature it times
building the Laplace approximation both ways, prints the times as ratios to one forward+backward
pass over the data, the speed-up, and the largest difference of the log evidence and predictive.

Usage: ``python benchmarks/laplace_last_layer.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from common import device_name, forward_backward, timed
from peers import make_workload
from torch import nn

from curvops.laplace import Laplace


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="64 images")
    args = parser.parse_args()
    device = torch.device(args.device)
    examples = 64 if args.quick else 1024
    model, data = make_workload("cnn", examples, min(256, examples), device, torch.float32)
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    head = model[-1]
    test = data[0][0][:16]
    print(f"last-layer Laplace on {device_name(device)}, float32: CNN, {examples} images, D = 1,290")
    reference = timed(lambda: forward_backward(model, loss_fn, data))
    print(f"forward+backward over the data: {1e3 * reference:.1f} ms")
    header = ("curvature", "[W, b] ms", "last_layer ms", "speed-up", "evidence diff", "predictive diff")
    row = "{:>10} {:>18} {:>18} {:>9} {:>14} {:>16}"
    print(row.format(*header))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random data: the network is at no minimum
        for curvature in ("kfac", "full"):

            def explicit(curvature=curvature):
                return Laplace(model, loss_fn, data, curvature=curvature, params=[head.weight, head.bias])

            def last(curvature=curvature):
                return Laplace(model, loss_fn, data, curvature=curvature, params="last_layer")

            explicit(), last()  # warm-up
            slow, fast = timed(explicit), timed(last)
            a, b = explicit(), last()
            evidence = float((a.log_marginal_likelihood() - b.log_marginal_likelihood()).abs())
            predictive = float((a.predictive(test) - b.predictive(test)).abs().max())
            times = (
                f"{1e3 * slow:.1f} ({slow / reference:.2f}x)",
                f"{1e3 * fast:.1f} ({fast / reference:.2f}x)",
            )
            speed = f"{slow / fast:.2f}x"
            print(row.format(curvature, *times, speed, f"{evidence:.1e}", f"{predictive:.1e}"))


if __name__ == "__main__":
    main()
