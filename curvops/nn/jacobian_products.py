"""Products with a model's Jacobian ``J = ∂f/∂θ`` through ``torch.func``: ``J v`` and ``J^T u``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_WEIGHTED_LAYERS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})


def pull_back(pullback: Callable, cotangents: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """``J^T u`` for every column ``u`` of ``cotangents`` (``[K, ...]``, or a tree of them),
    as ``{name: [K, *shape]}``.

    One backward pass per column through the same recorded forward pass: on CPU this is
    faster than ``vmap`` over the pullback (measured up to 4x for convolutions).

    Example:
        >>> weight = torch.randn(2, 3)
        >>> _, pullback = torch.func.vjp(lambda p: p["w"] @ torch.ones(3), {"w": weight})
        >>> pull_back(pullback, torch.eye(2))["w"].shape
        torch.Size([2, 2, 3])
    """
    if isinstance(cotangents, dict):
        count = next(iter(cotangents.values())).shape[0]
        columns = [pullback({name: t[k] for name, t in cotangents.items()})[0] for k in range(count)]
    else:
        columns = [pullback(u)[0] for u in cotangents]
    return {name: torch.stack([column[name] for column in columns]) for name in columns[0]}


def push_forward(
    forward: Callable, params: dict[str, Tensor], tree: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The output and ``J v`` for every column ``v`` of ``tree`` (``{name: [K, *shape]}``):
    ``(f(θ), [K, *output.shape])``.

    Forward mode (``vmap`` of ``jvp``) where every operation of the model has a forward-mode
    derivative; otherwise (e.g. ``nn.MultiheadAttention``'s fused kernel in eval mode) reverse
    over reverse: ``J^T u`` is linear in ``u``, so ``J v = ∂/∂u ⟨J^T u, v⟩``, one backward pass
    per column through a recorded pullback.

    Example:
        >>> weight, x = torch.randn(2, 3), torch.randn(3)
        >>> output, tangents = push_forward(lambda p: p["w"] @ x, {"w": weight}, {"w": torch.ones(4, 2, 3)})
        >>> torch.allclose(tangents, (torch.ones(2, 3) @ x).expand(4, 2))
        True
    """
    try:
        return vmap(lambda v: jvp(forward, (params,), (v,)), out_dims=(None, 0))(tree)
    except NotImplementedError as error:
        if "forward AD" not in str(error):
            raise
    output = forward(params)
    _, transpose = vjp(lambda u: vjp(forward, params)[1](u)[0], torch.zeros_like(output))
    count = next(iter(tree.values())).shape[0]
    columns = [transpose({name: t[k] for name, t in tree.items()})[0] for k in range(count)]
    return output, torch.stack(columns)


def linearized(
    forward: Callable, params: dict[str, Tensor], tree: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """``f(θ)``, ``J V`` for the ``K`` columns of ``tree`` (``{name: [K, *shape]}``) and the pullback
    ``U ↦ J^T U`` (``[K, *output.shape]`` to ``{name: [K, *shape]}``), from as few passes as the
    columns allow.

    One column: a single forward pass that carries ``J v`` as a forward-mode dual of the
    parameters beside the recorded graph, and then one backward pass (on a CPU 1.2-1.5x faster
    than recording the pullback and pushing forward in two forward passes). Several columns, or
    a model without forward-mode derivatives: :func:`torch.func.vjp` and :func:`push_forward`.

    Example:
        >>> weight, x = torch.randn(2, 3), torch.randn(3)
        >>> forward = lambda p: p["w"] @ x
        >>> output, tangents, pullback = linearized(forward, {"w": weight}, {"w": torch.ones(1, 2, 3)})
        >>> torch.allclose(tangents[0], torch.ones(2, 3) @ x)
        True
        >>> torch.allclose(pullback(torch.ones(1, 2))["w"][0], torch.outer(torch.ones(2), x))
        True
    """
    if next(iter(tree.values())).shape[0] == 1:
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        try:
            with torch.enable_grad(), forward_ad.dual_level(), _ConstantInputTangents():
                duals = {name: forward_ad.make_dual(p, tree[name][0]) for name, p in leaves.items()}
                output, tangent = forward_ad.unpack_dual(forward(duals))
        except NotImplementedError as error:
            if "forward AD" not in str(error):
                raise
        else:
            if tangent is None:  # the output does not depend on the parameters
                tangent = torch.zeros_like(output)

            def pullback(cotangents: Tensor) -> dict[str, Tensor]:
                grads = torch.autograd.grad(
                    output, list(leaves.values()), cotangents[0], allow_unused=True, materialize_grads=True
                )
                return {name: g.unsqueeze(0) for name, g in zip(leaves, grads, strict=True)}

            return output, tangent.unsqueeze(0), pullback
    output, vjp_fn = vjp(forward, params)
    _, tangents = push_forward(forward, params, tree)
    return output, tangents, lambda cotangents: pull_back(vjp_fn, cotangents)


class _ConstantInputTangents(TorchFunctionMode):
    """Forward mode through a linear or convolution layer whose input carries no tangent (the
    model's first layers): ``y = f(x; W, b)`` and ``ẏ = f(x; Ẇ, ḃ)``, two passes of the layer.
    PyTorch's own rule also multiplies a zero tangent of ``x`` by ``W`` (a third pass, on the
    widest input of the model): 1.6x faster for a ``Linear(256, 256)`` on a CPU.

    Example:
        >>> x, w, v = torch.randn(4, 3), torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)
        >>> with forward_ad.dual_level(), _ConstantInputTangents():
        ...     tangent = forward_ad.unpack_dual(F.linear(x, forward_ad.make_dual(w, v))).tangent
        >>> torch.allclose(tangent, x @ v.T)
        True
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func not in _WEIGHTED_LAYERS
            or len(args) < 2
            or forward_ad.unpack_dual(args[0]).tangent is not None
        ):
            return func(*args, **kwargs)
        weight, weight_tangent = forward_ad.unpack_dual(args[1])
        if weight_tangent is None:  # a frozen weight
            return func(*args, **kwargs)
        bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
        bias, bias_tangent = (None, None) if bias is None else forward_ad.unpack_dual(bias)
        inputs, rest = args[0], args[3:]
        output = func(inputs, weight, bias, *rest, **kwargs)
        return forward_ad.make_dual(output, func(inputs, weight_tangent, bias_tangent, *rest, **kwargs))


def add_trees(total: dict[str, Tensor] | None, part: dict[str, Tensor]) -> dict[str, Tensor]:
    """``total + part`` for ``{name: tensor}`` trees; ``part`` when there is no total yet.

    Example:
        >>> add_trees(add_trees(None, {"w": torch.ones(2)}), {"w": torch.ones(2)})
        {'w': tensor([2., 2.])}
    """
    return part if total is None else {name: total[name] + part[name] for name in total}
