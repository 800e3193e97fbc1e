"""Slow, obvious reference implementations of the flat-minimum family, for testing fast paths.

Everything here is written the way the papers write it: merged weights and perturbations are
materialised as dense tensors, and losses are computed with ``torch.func.functional_call`` on
W + P, so the model's own tensors are never written. Nothing here is fast or memory-frugal;
each function exists so that a production path (`flatopt.FlatPerturb`, `flatopt.sam.LoRASAM`,
…) can be compared with it, given the same inputs.

- Flat-LoRA (Li et al., 2025): ε_ij = σ_t · ‖W'_i,:‖₂ / √n · z_ij, with W' = W + ΔW
  (`merged_weight`, `flat_lora_noise`, `flat_lora_perturbations`, `seeded_z`).
- Any perturbation P per target: `perturbed_forward` and `perturbed_loss` evaluate the model
  at W + P.
- LoRA-SAM (SAM on the LoRA factors): `lora_sam_step`.
- Bi-LoRA (Liu et al., 2026): an auxiliary low-rank P = B₂A₂ per target, trained by gradient
  ascent and kept in a global Frobenius ball (`low_rank_perturbations`, `bilora_loss`,
  `bilora_clip`, `bilora_step`).

Layouts: a target's weight is stored in its *storage* layout (``(fan_in, out)`` when
``Target.transposed``); noise laws and low-rank factors are stated in the *logical* layout
``(out, fan_in)``, with a conv kernel flattened into fan_in. Perturbations returned here are
in the storage layout, ready to add to the stored tensor.

Example:
    >>> import torch
    >>> from flatopt.lora import add_lora
    >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 3)), ["0"], rank=2)
    >>> z = seeded_z(seed=0, step=0)
    >>> eps = flat_lora_perturbations(net, 0.05, z)
    >>> list(eps), eps["0.base.weight"].shape
    (['0.base.weight'], torch.Size([3, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .adapters import Adapter, Target, find_targets
from .noise import Delta, LowRank, derive_seed, draw_noise

__all__ = [
    "bilora_clip",
    "bilora_loss",
    "bilora_step",
    "flat_lora_noise",
    "flat_lora_perturbations",
    "lora_sam_step",
    "lora_targets",
    "low_rank_perturbations",
    "merged_weight",
    "perturbed_forward",
    "perturbed_loss",
    "seeded_z",
]

Noise = Union[Tensor, torch.Generator]
ZSource = Union[Callable[[int, Tensor], Tensor], Sequence[Tensor], torch.Generator]
Batch = tuple[Any, Any]
LossFn = Callable[[Any, Any], Tensor]


# -- layouts ---------------------------------------------------------------------------------


def _precision(weight: Tensor) -> torch.dtype:
    """fp64 for fp64 weights, fp32 for every other dtype: the precision the law is computed in."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _logical(tensor: Tensor, transposed: bool) -> Tensor:
    """``tensor`` (storage layout) as the ``(out, fan_in)`` matrix its rows define."""
    t = tensor.transpose(0, 1) if transposed else tensor
    return t.reshape(t.shape[0], -1)


def _storage(matrix: Tensor, like: Tensor, transposed: bool) -> Tensor:
    """The inverse of `_logical`: an ``(out, fan_in)`` matrix back in ``like``'s storage layout."""
    if not transposed:
        return matrix.reshape(like.shape)
    shape = list(like.shape)
    shape[0], shape[1] = shape[1], shape[0]
    return matrix.reshape(shape).transpose(0, 1)


def _dense_delta(weight: Tensor, delta: Delta, transposed: bool, dtype: torch.dtype) -> Tensor:
    """ΔW in ``weight``'s storage layout, in ``dtype``; zero for None (or an empty list)."""
    if delta is None:
        return torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    if isinstance(delta, Tensor):
        return delta.to(dtype)
    factors = [delta] if isinstance(delta, LowRank) else list(delta)
    total = torch.zeros(_logical(weight, transposed).shape, dtype=dtype, device=weight.device)
    for factor in factors:
        B = factor.B.reshape(factor.B.shape[0], -1).to(dtype)
        A = factor.A.reshape(factor.A.shape[0], -1).to(dtype)
        total = total + factor.scale * (B @ A)
    return _storage(total, weight, transposed)


# -- Flat-LoRA -------------------------------------------------------------------------------


@torch.no_grad()
def merged_weight(weight: Tensor, delta: Delta = None, *, transposed: bool = False) -> Tensor:
    """Return W' = W + ΔW as a new dense tensor in W's storage layout, in fp32 (fp64 for fp64 W).

    Args:
        weight: the base weight W in its storage layout.
        delta: None (ΔW = 0), a tensor in W's storage layout, a `LowRank` or a list of them
            (in the logical ``(out, fan_in)`` layout, as `flatopt.Target.delta` returns).
        transposed: W is stored as ``(fan_in, out, ...)``.

    Example:
        >>> W = torch.zeros(2, 3)
        >>> merged_weight(W, LowRank(torch.ones(2, 1), torch.ones(1, 3), scale=0.5))
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    dtype = _precision(weight)
    return weight.to(dtype) + _dense_delta(weight, delta, transposed, dtype)


def _standard_normal(weight: Tensor, z: Noise, dtype: torch.dtype) -> Tensor:
    if isinstance(z, torch.Generator):
        return torch.randn(weight.shape, generator=z, dtype=dtype, device=weight.device)
    if not isinstance(z, Tensor):
        raise TypeError(
            f"z must be a tensor of standard normals shaped like the weight, or a "
            f"torch.Generator to draw them from; got {type(z).__name__}."
        )
    if z.shape != weight.shape:
        raise ValueError(
            f"z has shape {tuple(z.shape)} but the weight has {tuple(weight.shape)}; pass z in "
            "the weight's storage layout."
        )
    return z.to(dtype)


@torch.no_grad()
def flat_lora_noise(
    weight: Tensor,
    delta: Delta,
    sigma_t: float,
    z: Noise,
    *,
    transposed: bool = False,
) -> Tensor:
    """Return Flat-LoRA's ε for one weight, given the standard normals z explicitly.

    ε_ij = σ_t · ‖W'_i,:‖₂ / √n · z_ij, where W' = W + ΔW is read as an ``m × n`` matrix
    (rows are output features; a conv kernel is flattened into n), computed from a dense W'.
    The result is a constant (no gradient), in W's storage layout, in fp32 (fp64 for fp64 W).

    Args:
        weight: the base weight W in its storage layout.
        delta: ΔW, as for `merged_weight`.
        sigma_t: σ_t, the relative noise scale of this step.
        z: standard normals shaped like ``weight`` (storage layout), or a ``torch.Generator``
            on W's device to draw them from.
        transposed: W is stored as ``(fan_in, out, ...)``.

    Raises:
        TypeError: ``z`` is neither a tensor nor a generator.
        ValueError: ``z`` is not shaped like ``weight``.

    Example:
        >>> W = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> flat_lora_noise(W, None, 0.1, torch.ones(2, 2))  # σ·‖W_i‖/√2 on each row
        tensor([[0.3536, 0.3536],
                [0.0707, 0.0707]])
    """
    dtype = _precision(weight)
    merged = _logical(merged_weight(weight, delta, transposed=transposed), transposed)
    fan_in = merged.shape[1]
    std = sigma_t * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(max(fan_in, 1))
    normals = _logical(_standard_normal(weight, z, dtype), transposed)
    return _storage(std[:, None] * normals, weight, transposed)


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """The qualified name of every parameter and buffer, by tensor identity (first name wins)."""
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(tensor), name)
    return names


def lora_targets(model: nn.Module, adapters: Iterable[Adapter] = ()) -> dict[str, Target]:
    """The model's targets by the qualified name of the tensor each reads, in flatopt's order.

    Targets come from `flatopt.adapters.find_targets`, one entry per distinct weight (a tied
    weight appears once, under its first name). The i-th entry is target index i, the index
    `flatopt.FlatPerturb` seeds that weight's noise with.

    Raises:
        ValueError: no adapter recognises a LoRA layer, or a target's tensor is not a
            parameter or buffer of ``model``.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
        >>> list(lora_targets(net))
        ['0.base.weight', '1.base.weight']
    """
    names = _tensor_names(model)
    targets: dict[str, Target] = {}
    seen: set[int] = set()
    for module_name, target in find_targets(model, adapters):
        weight = target.weight
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        if id(weight) not in names:
            raise ValueError(
                f"The target of module {module_name!r} reads a tensor that is neither a "
                "parameter nor a buffer of the model, so functional_call cannot replace it. "
                "Register it on its module (nn.Parameter or register_buffer)."
            )
        targets[names[id(weight)]] = target
    return targets


def _kept_row(target: Target) -> int | None:
    """An embedding's ``padding_idx``: a fixed pad whose row flatopt leaves unperturbed."""
    owner, _ = target.owner()
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return owner.padding_idx
    return None


def seeded_z(
    seed: int, step: int, *, draw: int = 0, rank: int = 0
) -> Callable[[int, Tensor], Tensor]:
    """The standard normals `flatopt.FlatPerturb` draws at ``step``, as ``z(index, weight)``.

    Target ``index`` (the order of `lora_targets`) gets the z that FlatPerturb regenerates from
    ``derive_seed(seed, step, draw, index, rank)``, drawn in the weight's dtype and returned in
    fp32 (fp64 for fp64 weights). ``draw`` is 0 with ``resample="step"``; ``rank`` is 0 outside
    ``torch.distributed``.

    Example:
        >>> z = seeded_z(seed=1, step=3)
        >>> W = torch.zeros(4, 5)
        >>> torch.equal(z(0, W), z(0, W)), torch.equal(z(0, W), z(1, W))
        (True, False)
    """

    def z(index: int, weight: Tensor) -> Tensor:
        rows = 1 if weight.ndim == 0 else weight.shape[0]
        ones = torch.ones(rows, dtype=_precision(weight), device=weight.device)
        generator = torch.Generator(device=weight.device)
        return draw_noise(
            weight, ones, generator=generator, seed=derive_seed(seed, step, draw, index, rank)
        )

    return z


def _z_for(z: ZSource, index: int, weight: Tensor) -> Noise:
    if isinstance(z, torch.Generator):
        return z
    if callable(z):
        return z(index, weight)
    return z[index]


def flat_lora_perturbations(
    model: nn.Module, sigma_t: float, z: ZSource, adapters: Iterable[Adapter] = ()
) -> dict[str, Tensor]:
    """Flat-LoRA's ε for every target of ``model``, by the qualified name of the weight.

    Each target's ε is `flat_lora_noise` of its weight and merged update. An embedding's
    ``padding_idx`` row gets no noise, as in FlatPerturb. Pass the result to
    `perturbed_forward` or `perturbed_loss`.

    Args:
        model: the model to scan with the adapters (see `lora_targets`).
        sigma_t: σ_t, the relative noise scale of this step.
        z: the standard normals: a callable ``z(index, weight)`` (e.g. `seeded_z`, to get
            FlatPerturb's own), a sequence of tensors in `lora_targets` order, or one
            ``torch.Generator`` drawn from target after target.
        adapters: extra adapters, tried before the built-in ones.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 2)), ["0"], rank=1)
        >>> eps = flat_lora_perturbations(net, 0.0, torch.Generator().manual_seed(0))
        >>> bool(eps["0.base.weight"].abs().max() == 0)
        True
    """
    perturbations = {}
    for index, (name, target) in enumerate(lora_targets(model, adapters).items()):
        weight = target.weight
        delta = target.delta() if target.delta is not None else None
        eps = flat_lora_noise(
            weight, delta, sigma_t, _z_for(z, index, weight), transposed=target.transposed
        )
        keep = _kept_row(target)
        if keep is not None:
            eps[keep] = 0
        perturbations[name] = eps
    return perturbations


# -- any perturbation P ------------------------------------------------------------------------


def _replaced(model: nn.Module, perturbations: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """W + P for each named tensor, in W's dtype: what the forward sees (W is not written)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    replaced = {}
    for name, perturbation in perturbations.items():
        if name not in tensors:
            raise ValueError(
                f"perturbations names {name!r}, which is not a parameter or buffer of the model; "
                f"its tensors include {sorted(tensors)[:8]}. Key perturbations by qualified "
                "names, as lora_targets() returns them."
            )
        tensor = tensors[name]
        if perturbation.shape != tensor.shape:
            raise ValueError(
                f"perturbations[{name!r}] has shape {tuple(perturbation.shape)}, the tensor "
                f"{tuple(tensor.shape)}; pass it in the tensor's storage layout."
            )
        acc = torch.promote_types(tensor.dtype, perturbation.dtype)
        replaced[name] = (tensor.to(acc) + perturbation.to(acc)).to(tensor.dtype)
    return replaced


def perturbed_forward(
    model: nn.Module, perturbations: Mapping[str, Tensor], *args: Any, **kwargs: Any
) -> Any:
    """Return ``model(*args, **kwargs)`` computed at W + P for every named tensor W.

    W + P is formed in the wider of the two dtypes and rounded once to W's dtype, then handed
    to ``torch.func.functional_call``: the model's tensors are never written. Gradients flow
    to the model's parameters and to any P that requires grad.

    Raises:
        ValueError: a name is not a parameter or buffer of ``model``, or a P has the wrong shape.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(1.0)
        >>> perturbed_forward(lin, {"weight": torch.tensor([[0.5, -1.0]])}, torch.ones(1, 2))
        tensor([[1.5000]], grad_fn=<MmBackward0>)
    """
    params = dict(model.named_parameters())
    params.update(_replaced(model, perturbations))
    return functional_call(model, params, args, kwargs)


def perturbed_loss(
    model: nn.Module, loss_fn: LossFn, batch: Batch, perturbations: Mapping[str, Tensor]
) -> Tensor:
    """Return ``loss_fn(model(x), y)`` at W + P, for a batch ``(x, y)``; W is never written.

    ``x`` is passed as ``model(x)``, or as ``model(*x)`` when it is a tuple.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> batch = (torch.ones(3, 2), torch.zeros(3, 1))
        >>> clean = perturbed_loss(lin, torch.nn.functional.mse_loss, batch, {})
        >>> torch.allclose(clean, torch.nn.functional.mse_loss(lin(batch[0]), batch[1]))
        True
    """
    inputs, target = batch
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return loss_fn(perturbed_forward(model, perturbations, *args), target)


# -- LoRA-SAM ----------------------------------------------------------------------------------


def _trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's parameters that require grad, by their qualified name in ``model``."""
    names = _tensor_names(model)
    params = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in names:
                raise ValueError(
                    f"The optimizer holds a parameter of shape {tuple(p.shape)} that is not in "
                    "the model; build the optimizer over this model's parameters."
                )
            params[names[id(p)]] = p
    return params


def lora_sam_step(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    rho: float,
    *,
    adaptive: bool = False,
) -> Tensor:
    """One step of SAM on the trainable parameters (the LoRA factors), written out in full.

    1. g = ∇_θ L(θ) for the optimizer's parameters θ that require grad.
    2. ε = ρ · g / ‖g‖, with ‖g‖ the global 2-norm over all of them (ε = 0 when ‖g‖ = 0).
       With ``adaptive`` (ASAM, as davda54/sam): ε = ρ · θ² ⊙ g / ‖|θ| ⊙ g‖.
    3. g' = ∇_θ L(θ + ε), evaluated with ``functional_call``: θ itself is never moved.
    4. ``p.grad = g'`` (None for the others) and ``optimizer.step()``.

    Parameters that get no gradient (None) are neither perturbed nor counted in the norm.
    Norms are taken in fp64.

    Args:
        model: the model; its trainable parameters must be the optimizer's.
        loss_fn: ``loss_fn(output, y)``.
        batch: ``(x, y)``, see `perturbed_loss`.
        optimizer: the inner optimizer; it takes the step with g'.
        rho: ρ, the radius of the perturbation.
        adaptive: ASAM's element-wise scaled perturbation.

    Returns:
        L(θ), the loss before the step (detached).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> batch = (torch.ones(4, 2), torch.zeros(4, 1))
        >>> loss = lora_sam_step(lin, torch.nn.functional.mse_loss, batch, opt, rho=0.05)
        >>> loss.shape
        torch.Size([])
    """
    params = _trainable(model, optimizer)
    names, tensors = list(params), list(params.values())
    loss = perturbed_loss(model, loss_fn, batch, {})
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None]
    scaled = [
        (tensors[i].detach().abs() * grads[i] if adaptive else grads[i]).double().flatten()
        for i in used
    ]  # ε is a constant: no gradient flows through it to θ
    norm = torch.linalg.vector_norm(torch.cat(scaled)) if scaled else torch.zeros(())
    scale = rho / norm if norm > 0 else 0.0
    epsilon = {}
    for i in used:
        direction = grads[i].detach().to(torch.float64)
        if adaptive:
            direction = tensors[i].detach().to(torch.float64).square() * direction
        epsilon[names[i]] = (scale * direction).to(tensors[i].dtype)
    second = perturbed_loss(model, loss_fn, batch, epsilon)
    grads_at_epsilon = torch.autograd.grad(second, tensors, allow_unused=True)
    for tensor in tensors:
        tensor.grad = None
    for i in used:
        tensors[i].grad = grads_at_epsilon[i]
    optimizer.step()
    return loss.detach()


# -- Bi-LoRA -----------------------------------------------------------------------------------


def low_rank_perturbations(
    model: nn.Module, aux_factors: Mapping[str, LowRank], adapters: Iterable[Adapter] = ()
) -> dict[str, Tensor]:
    """P = scale · B₂ @ A₂ for each named target, in that weight's storage layout.

    Args:
        model: the model whose targets the names refer to (see `lora_targets`).
        aux_factors: `flatopt.LowRank` factors ``B₂ (out, r₂)``, ``A₂ (r₂, fan_in)`` in the
            logical layout, by target name. Bi-LoRA's auxiliary module has no scaling:
            ``LowRank(B2, A2)``.
        adapters: extra adapters, tried before the built-in ones.

    Returns:
        Differentiable perturbations: gradients flow back to B₂ and A₂.

    Raises:
        ValueError: a name is not a target of ``model``.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(3, 2)), ["0"], rank=1)
        >>> aux = {"0.base.weight": LowRank(torch.ones(2, 1), torch.ones(1, 3))}
        >>> low_rank_perturbations(net, aux)["0.base.weight"].shape
        torch.Size([2, 3])
    """
    targets = lora_targets(model, adapters)
    perturbations = {}
    for name, factor in aux_factors.items():
        if name not in targets:
            raise ValueError(
                f"aux_factors names {name!r}, which is not a target of the model; its targets "
                f"are {list(targets)}."
            )
        target = targets[name]
        weight = target.weight
        B = factor.B.reshape(factor.B.shape[0], -1)
        A = factor.A.reshape(factor.A.shape[0], -1)
        perturbations[name] = _storage(factor.scale * (B @ A), weight, target.transposed)
    return perturbations


def bilora_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    aux_factors: Mapping[str, LowRank],
    adapters: Iterable[Adapter] = (),
) -> Tensor:
    """Bi-LoRA's loss L(W + s·B₁A₁ + B₂A₂): the model's forward with P = B₂A₂ on each target.

    Its gradient reaches the primary factors B₁, A₁ (through the model's own LoRA branch) and
    the auxiliary B₂, A₂, both taken at the same merged weight, in one backward pass.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(3, 2)), ["0"], rank=1)
        >>> B2 = torch.zeros(2, 1, requires_grad=True)
        >>> aux = {"0.base.weight": LowRank(B2, torch.ones(1, 3))}
        >>> batch = (torch.ones(4, 3), torch.zeros(4, 2))
        >>> bilora_loss(net, torch.nn.functional.mse_loss, batch, aux).backward()
        >>> B2.grad.shape
        torch.Size([2, 1])
    """
    perturbations = low_rank_perturbations(model, aux_factors, adapters)
    return perturbed_loss(model, loss_fn, batch, perturbations)


def _factor_pairs(aux_factors: Any) -> list[tuple[Tensor, Tensor, float]]:
    items = aux_factors.values() if isinstance(aux_factors, Mapping) else aux_factors
    pairs = []
    for item in items:
        if isinstance(item, LowRank):
            pairs.append((item.B, item.A, item.scale))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((item[0], item[1], 1.0))
        else:
            raise TypeError(
                f"aux_factors holds {type(item).__name__}; pass LowRank(B2, A2) values or "
                "(B2, A2) pairs."
            )
    return pairs


@torch.no_grad()
def bilora_clip(aux_factors: Any, rho: float) -> Tensor:
    """Bi-LoRA's global clip: keep ‖(B₂A₂)_j‖ over all targets j inside a Frobenius ball of ρ.

    c = √(Σ_j ‖s_j·B₂⁽ʲ⁾A₂⁽ʲ⁾‖_F²); if c > ρ, every B₂ and every A₂ is multiplied in place by
    √(ρ/c), so each product shrinks by ρ/c and c becomes ρ. Nothing changes when c ≤ ρ.

    Args:
        aux_factors: `flatopt.LowRank` values (a mapping or an iterable) or ``(B2, A2)`` pairs.
        rho: ρ, the radius of the ball.

    Returns:
        c, the global norm before clipping.

    Raises:
        TypeError: an item is neither a LowRank nor a pair.

    Example:
        >>> B, A = torch.full((2, 1), 2.0), torch.ones(1, 2)  # ‖BA‖_F = 4
        >>> bilora_clip([(B, A)], rho=1.0)
        tensor(4.)
        >>> torch.linalg.matrix_norm(B @ A)
        tensor(1.)
    """
    pairs = _factor_pairs(aux_factors)
    squares = [
        torch.linalg.matrix_norm(
            scale * B.reshape(B.shape[0], -1).double() @ A.reshape(A.shape[0], -1).double()
        ).square()
        for B, A, scale in pairs
    ]
    norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
    if norm > rho:
        factor = math.sqrt(rho / float(norm))
        for B, A, _ in pairs:
            B.mul_(factor)
            A.mul_(factor)
    dtype = pairs[0][0].dtype if pairs else torch.float32
    return norm.to(dtype)


def _check_ascending(aux_factors: Mapping[str, LowRank], optimizers: list) -> None:
    """Every auxiliary factor is held by a param group with ``maximize=True``."""
    groups = {
        id(p): (index, group)
        for optimizer in optimizers
        for index, group in enumerate(optimizer.param_groups)
        for p in group["params"]
    }
    for name, factor in aux_factors.items():
        for label, tensor in (("B", factor.B), ("A", factor.A)):
            if id(tensor) not in groups:
                raise ValueError(
                    f"aux_factors[{name!r}].{label} is in no param group of the optimizers; "
                    "add the auxiliary factors to one, with maximize=True."
                )
            index, group = groups[id(tensor)]
            if group.get("maximize") is not True:
                raise ValueError(
                    f"aux_factors[{name!r}].{label} is in param group {index} with "
                    f"maximize={group.get('maximize')!r}; Bi-LoRA's auxiliary factors ascend: "
                    "put them in a group with maximize=True, e.g. torch.optim.AdamW([{'params': "
                    "main}, {'params': aux, 'maximize': True}], lr=lr)."
                )


def bilora_step(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    aux_factors: Mapping[str, LowRank],
    rho: float,
    *,
    aux_optimizer: Optional[torch.optim.Optimizer] = None,
    adapters: Iterable[Adapter] = (),
) -> Tensor:
    """One Bi-LoRA step: one forward and backward, descent on B₁A₁, ascent on B₂A₂, then clip.

    1. Clear the optimizers' gradients.
    2. L = `bilora_loss`; ``L.backward()`` gives every factor its gradient at the merged
       weight W + s·B₁A₁ + B₂A₂.
    3. ``optimizer.step()`` (and ``aux_optimizer.step()`` when given): descent on the primary
       factors, ascent on the auxiliary ones, which must sit in param groups with
       ``maximize=True`` (for torch's optimizers, a step on −g). One optimizer with an extra
       ``{"params": aux, "maximize": True}`` group gives both the same learning rate and
       schedule, the paper's default.
    4. `bilora_clip` (``aux_factors``, ρ), after every step.

    Returns:
        L before the step (detached).

    Raises:
        ValueError: an auxiliary factor is in no param group, or in one without
            ``maximize=True``.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(3, 2)), ["0"], rank=1)
        >>> B2 = torch.nn.Parameter(torch.zeros(2, 1))
        >>> A2 = torch.nn.Parameter(torch.full((1, 3), 0.1))
        >>> aux = {"0.base.weight": LowRank(B2, A2)}
        >>> main = [p for p in net.parameters() if p.requires_grad]
        >>> groups = [{"params": main}, {"params": [B2, A2], "maximize": True}]
        >>> opt = torch.optim.SGD(groups, lr=0.1)
        >>> batch = (torch.ones(4, 3), torch.zeros(4, 2))
        >>> loss = bilora_step(net, torch.nn.functional.mse_loss, batch, opt, aux, rho=0.05)
        >>> bool(bilora_clip(aux, 0.05) <= 0.05 + 1e-6)
        True
    """
    optimizers = [optimizer] if aux_optimizer is None else [optimizer, aux_optimizer]
    _check_ascending(aux_factors, optimizers)
    for each in optimizers:
        each.zero_grad(set_to_none=True)
    loss = bilora_loss(model, loss_fn, batch, aux_factors, adapters)
    loss.backward()
    for each in optimizers:
        each.step()
    bilora_clip(aux_factors, rho)
    return loss.detach()
