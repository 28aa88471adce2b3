"""Checks that a model's forward pass is one fixed function of each datum.

The model's forward passes must not draw random numbers (:func:`fixed_forward`), and batch
normalisation with batch statistics is refused (:func:`check_batch_statistics`): with the
checks of every pass over the data (:mod:`curvops.nn.passes`) they make an operator one fixed
matrix, the curvature of a loss that is a sum over the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import NonDeterministicDataError

RANDOM_FORWARD = (
    "The model draws random numbers in its forward pass (dropout or another random layer in train "
    "mode?), so its curvature is not one fixed matrix; call model.eval() or use a fixed dropout mask."
)


def _rng_states() -> list[Tensor]:
    """The global random number generators' states: the CPU's, and every GPU's once CUDA is up."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: list[Tensor]) -> bool:
    """Put back ``states`` if the generators moved since; whether they had."""
    now = _rng_states()
    if len(now) == len(states) and all(torch.equal(a, b) for a, b in zip(now, states, strict=True)):
        return False
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state_all(states[1:])
    return True


@contextmanager
def fixed_forward() -> Iterator[None]:
    """Refuse a model that draws random numbers in the forward passes run inside.

    Two signs: torch.func's own error for a random operation under ``vmap``, and any change of
    the global generators' states (:func:`torch.get_rng_state`, CUDA's too), which are then
    restored, so the user's random stream is never moved. Wrap model computations only, not
    the iteration over a ``DataLoader`` (which draws random numbers for its own seeds).

    Example:
        >>> with fixed_forward():  # doctest: +ELLIPSIS
        ...     torch.nn.Dropout(0.5)(torch.ones(4))
        Traceback (most recent call last):
        ...
        curvops.errors.NonDeterministicDataError: The model draws random numbers ... fixed dropout mask.
    """
    before = _rng_states()
    try:
        yield
    except RuntimeError as error:
        if "random operation" not in str(error):
            raise
        raise NonDeterministicDataError(RANDOM_FORWARD) from error
    finally:
        moved = _restore_rng(before)
    if moved:
        raise NonDeterministicDataError(RANDOM_FORWARD)


def check_batch_statistics(model: nn.Module) -> None:
    """Refuse batch normalisation that normalises with the batch's own statistics.

    In train mode (or without running statistics) a ``BatchNorm`` layer couples the data of a
    batch, so the loss is not a sum over data and depends on the batching; in train mode it also
    updates its running statistics in every forward pass.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> check_batch_statistics(model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: '1' is a BatchNorm1d in train mode ...; call model.eval().
        >>> check_batch_statistics(model.eval())
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            mode = "in train mode" if module.training else "without running statistics"
            raise ValueError(
                f"{name or type(module).__name__!r} is a {type(module).__name__} {mode} (batch "
                "normalisation with the batch's own statistics): the loss is then not a sum over data, "
                "and curvops never updates a model's running statistics; call model.eval()"
                + ("." if module.training else " after training with track_running_stats=True.")
            )
