"""``nn.MultiheadAttention``: its input projection and ``out_proj`` as Kronecker layers.

``nn.MultiheadAttention`` projects its inputs inside ``F.multi_head_attention_forward``, with
``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when ``kdim`` or
``vdim`` differ from ``embed_dim``) and ``out_proj.weight``, so no module hook sees the
projections. The rule's forward hook (:meth:`AttentionRule.capture`) recomputes the call with the
projections exposed: ``y = x W^T + b`` for the input projection, the attention itself by
``F.multi_head_attention_forward`` with identity projections (so every mask, ``is_causal``,
``need_weights``, ``bias_k``/``bias_v`` and ``add_zero_attn`` behave exactly as in the module),
then ``out_proj`` on the concatenated heads; the forward pass goes on with the recomputed output,
equal to the module's. The model itself is never changed.

Each projection is a linear layer shared over the tokens (``kfac_approx`` expand/reduce as for an
``nn.Linear`` with leading axes; the batch axis is the data axis, ``batch_first`` either way):

=================  ============================================  =====================================
part (label)       when                                          weight and bias
=================  ============================================  =====================================
``in_proj``        self-attention (query, key and value one      ``in_proj_weight`` ``[3E, E]``,
                   tensor) with ``kdim = vdim = embed_dim``      ``in_proj_bias``
``in_proj.q``,     otherwise: cross-attention, ``kdim`` or       rows ``[0, E)``, ``[E, 2E)``,
``in_proj.k``,     ``vdim`` differ, or                           ``[2E, 3E)`` of ``in_proj_weight``
``in_proj.v``      ``AttentionRule(in_projection="separate")``   (or ``q/k/v_proj_weight``) and of
                                                                 ``in_proj_bias``
``out_proj``       always                                        ``out_proj.weight``, ``out_proj.bias``
=================  ============================================  =====================================

Which parts a module has depends on how it is called: the builders make its layers at its call
in the first batch, the optimizer at its first captured call (and from a state dict's layer
names); :func:`~curvops.nn.coverage` (no data) takes a module with ``kdim = vdim = embed_dim``
as self-attention.

A part of the module ``"attn"`` is the layer ``"attn.in_proj"`` (``"attn.in_proj.q"``,
``"attn.out_proj"``); its blocks are labelled ``"attn.in_proj.weight"`` and ``"attn.in_proj.bias"``
(``"attn.in_proj"`` for a joint bias), as a linear layer of that name would be. ``bias_k`` and
``bias_v`` (``add_bias_kv=True``) have no Kronecker block: they are "others" (``unsupported=``).
Refused, naming the module: attention dropout in train mode (a random forward), unbatched
(2-D) inputs (no data axis), a subclass with a forward of its own, and, in the optimizer, a
module called as self-attention in one step and cross-attention in another.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...linalg.checks import check_choice
from .rule import DenseInputRule, KroneckerLayer, differentiable

IN_PROJECTIONS = ("auto", "separate")
_FORWARD = inspect.signature(nn.MultiheadAttention.forward)
_PARAMETERS = (
    "in_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "in_proj_bias",
    "out_proj.weight",
    "out_proj.bias",
)


class AttentionRule(DenseInputRule):
    """``nn.MultiheadAttention``'s input projection (one joint q/k/v block, or q, k and v) and
    ``out_proj`` as Kronecker layers (see the module docstring).

    Args:
        in_projection: ``"auto"`` (one joint block for self-attention with ``kdim = vdim =
            embed_dim``; q, k and v blocks otherwise) or ``"separate"`` (q, k and v blocks always).

    Example:
        >>> attn = torch.nn.MultiheadAttention(4, 2)
        >>> every = {id(p) for p in attn.parameters()}
        >>> [layer.name for layer in AttentionRule().layers("attn", attn, every, "separate")]
        ['attn.in_proj', 'attn.out_proj']
        >>> rule = AttentionRule(in_projection="separate")
        >>> [layer.sizes for layer in rule.layers("attn", attn, {id(attn.in_proj_weight)}, "separate")]
        [(4, 4), (4, 4), (4, 4)]
    """

    owns_submodules: ClassVar[bool] = True
    parts_depend_on_call: ClassVar[bool] = True

    def __init__(self, in_projection: str = "auto") -> None:
        check_choice(in_projection, IN_PROJECTIONS, "in_projection")
        self.in_projection = in_projection

    def check(self, name: str, module: nn.Module, kfac_approx: str) -> None:
        if type(module).forward is not nn.MultiheadAttention.forward:
            raise ValueError(
                f"{name!r} ({type(module).__name__}) is an nn.MultiheadAttention with a forward of its "
                "own; KFAC's attention rule recomputes nn.MultiheadAttention.forward. Register a rule for "
                "it (curvops.nn.register_layer_rule), or leave its parameters out of params."
            )

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        return _PARAMETERS

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.bias_k is None:
            return None
        return (
            "its bias_k and bias_v (add_bias_kv=True) are appended to the projected keys and values, "
            "with no Kronecker block"
        )

    def joint(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Whether a call's input projection is one joint q/k/v block: ``in_projection="auto"``,
        ``kdim = vdim = embed_dim`` and query, key and value one tensor."""
        same = query is key and key is value
        return self.in_projection == "auto" and module._qkv_same_embed_dim and same

    def layers(
        self, name: str, module: nn.Module, chosen: set[int], bias: str, parts: frozenset | None = None
    ) -> list[KroneckerLayer]:
        """The parts' layers; before any call (``parts`` is ``None``) a module with ``kdim = vdim =
        embed_dim`` is taken as self-attention."""
        same_dims = self.in_projection == "auto" and module._qkv_same_embed_dim
        joint = same_dims and (parts is None or "in_proj" in parts)
        out = module.out_proj
        embed = module.embed_dim
        specs = [
            *_in_projection_specs(module, joint),
            ("out_proj", out.weight, out.bias, (embed, embed), (None, None)),
        ]
        layers = [_part(self, name, module, chosen, bias, *spec) for spec in specs]
        return [layer for layer in layers if layer is not None]

    def features(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """A projection's input, captured ``[L, N, n_in]`` (sequence first), as ``[N, L, n_in]``."""
        return inputs.transpose(0, 1)

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        """``[K, L, N, n_out]`` gradients w.r.t. a projection's output as ``[K, N, L, n_out]``."""
        return gradients.transpose(1, 2)

    def capture(
        self, name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> tuple[Any, dict[str | None, tuple[Tensor, Tensor]]]:
        """The call recomputed with its projections exposed: ``(attn_output, attn_weights)`` as the
        module gives them, and each part's ``(input, output)``, sequence first."""
        arguments = _arguments(module, args, kwargs)
        query, key, value = arguments["query"], arguments["key"], arguments["value"]
        _check_call(name, module, query)
        joint = self.joint(module, query, key, value)
        if module.batch_first:  # as the module does, keeping which inputs are one tensor
            same = query is key, key is value
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
            key = query if same[0] else key
            value = key if same[1] else value
        parts: dict[str | None, tuple[Tensor, Tensor]] = {}
        q, k, v = _in_projection(module, query, key, value, joint, parts)
        heads, weights = _attention(module, q, k, v, arguments)
        out = differentiable(F.linear(heads, module.out_proj.weight, module.out_proj.bias))
        parts["out_proj"] = (heads, out)
        return ((out.transpose(1, 0) if module.batch_first else out), weights), parts


def _in_projection(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, joint: bool, parts: dict
) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` from the input projection (one joint block, or q, k and v), each part's
    ``(input, output)`` put in ``parts``."""
    if joint:
        projected = differentiable(F.linear(query, module.in_proj_weight, module.in_proj_bias))
        parts["in_proj"] = (query, projected)
        return projected.chunk(3, dim=-1)
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
    projected = []
    for part, x, w, b in zip("qkv", (query, key, value), weights, biases, strict=True):
        y = differentiable(F.linear(x, w, b))
        parts[f"in_proj.{part}"] = (x, y)
        projected.append(y)
    return tuple(projected)


def _arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, with the defaults of ``nn.MultiheadAttention.forward``."""
    call = _FORWARD.bind(module, *args, **kwargs)
    call.apply_defaults()
    return call.arguments


def _in_projection_specs(module: nn.Module, joint: bool) -> list[tuple]:
    """``(part, weight, bias, (n_out, n_in), (weight rows, bias rows))`` of the input projection's
    parts: one joint block, or q, k and v (rows of ``in_proj_weight``, or ``q/k/v_proj_weight``)."""
    embed, bias = module.embed_dim, module.in_proj_bias
    if joint:
        return [("in_proj", module.in_proj_weight, bias, (3 * embed, embed), (None, None))]
    specs = []
    for i, (part, size) in enumerate(zip("qkv", (embed, module.kdim, module.vdim), strict=True)):
        rows = (i * embed, (i + 1) * embed)
        if module._qkv_same_embed_dim:
            weight, weight_rows = module.in_proj_weight, rows
        else:
            weight, weight_rows = getattr(module, f"{part}_proj_weight"), None
        specs.append((f"in_proj.{part}", weight, bias, (embed, size), (weight_rows, rows)))
    return specs


def _part(
    rule: AttentionRule,
    name: str,
    module: nn.Module,
    chosen: set[int],
    bias: str,
    part: str,
    weight: nn.Parameter,
    bias_param: nn.Parameter | None,
    shape: tuple[int, int],
    rows: tuple,
) -> KroneckerLayer | None:
    """The layer of one part (on ``rows``: those of its weight and bias), or ``None`` if neither
    its weight nor its bias is chosen."""
    chosen_weight = weight if id(weight) in chosen else None
    chosen_bias = bias_param if bias_param is not None and id(bias_param) in chosen else None
    if chosen_weight is None and chosen_bias is None:
        return None
    joint = bias == "joint" and chosen_weight is not None and chosen_bias is not None
    label = f"{name}.{part}" if name else part
    return KroneckerLayer(label, module, rule, chosen_weight, chosen_bias, joint, part, shape, *rows)


def _check_call(name: str, module: nn.Module, query: Tensor) -> None:
    """Refuse the calls the rule does not handle: dropout in train mode, unbatched inputs."""
    if module.training and module.dropout > 0:
        raise ValueError(
            f"{name!r} (MultiheadAttention) has attention dropout {module.dropout} in train mode: its "
            "forward draws random numbers, so its curvature is not one fixed matrix. Call model.eval(), "
            "or build it with dropout=0.0."
        )
    if query.dim() != 3:
        raise ValueError(
            f"{name!r} (MultiheadAttention) is called with unbatched {query.dim()}-D inputs; KFAC needs "
            "their batch axis as the data axis. Pass query, key and value with a batch axis "
            "([N, L, E] for batch_first=True, else [L, N, E])."
        )


def _attention(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, arguments: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """The module's attention of projected ``q, k, v`` (sequence first): its heads concatenated
    ``[L, N, E]`` (before ``out_proj``) and its weights, by ``F.multi_head_attention_forward``
    with identity projections and the masks canonicalised as the module does."""
    key_padding_mask = F._canonical_mask(
        mask=arguments["key_padding_mask"],
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(arguments["attn_mask"]),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=arguments["attn_mask"],
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=q.dtype,
        check_other=False,
    )
    eye = torch.eye(module.embed_dim, dtype=q.dtype, device=q.device)
    return F.multi_head_attention_forward(
        q,
        k,
        v,
        module.embed_dim,
        module.num_heads,
        None,
        None,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        module.dropout,
        eye,
        None,
        training=module.training,
        key_padding_mask=key_padding_mask,
        need_weights=arguments["need_weights"],
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=arguments["average_attn_weights"],
        is_causal=arguments["is_causal"],
    )
