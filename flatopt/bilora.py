"""``BiLoRA``: Bi-LoRA's adversarial low-rank perturbation, trained in the same backward pass.

Bi-LoRA (Liu et al., arXiv 2508.19564, ICLR 2026) gives every target an auxiliary low-rank
module B₂A₂ beside its LoRA B₁A₁. The training forward sees W + s·B₁A₁ + B₂A₂; one backward
gives both modules their gradient at that merged weight; B₁, A₁ descend and B₂, A₂ ascend;
then one global clip keeps c = √(Σ_targets ‖B₂A₂‖_F²) ≤ ρ. The auxiliary module is SAM's
adversarial perturbation, built by ascent over the steps instead of by a second pass.

Here B₂A₂ is a `flatopt._swap.Perturbation` (`Auxiliary`): it rides the hooks, saved-tensor
tokens and exactness of `FlatPerturb`, and the wrapper is a `FlatPerturb` whose law is the
auxiliary module instead of noise. Backward regenerates W + B₂A₂ from W and the factors, and
routes the gradient G (taken at the merged weight, in the logical layout) to the factors:
grad B₂ = G·A₂ᵀ, grad A₂ = B₂ᵀ·G.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _zero
from ._arming import Arming, Site
from .adapters import Adapter
from .noise import LowRank, _logical_matrix, derive_seed
from .perturb import FlatPerturb, _is_int, _State, check_number

__all__ = ["Auxiliary", "BiLoRA", "clip_", "low_rank_norm_sq"]


# -- the perturbation P = B₂A₂ ---------------------------------------------------------------


def _storage(matrix: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    """A logical ``(out, fan_in)`` matrix in ``weight``'s storage layout."""
    if not transposed:
        return matrix.reshape(weight.shape)
    if weight.ndim == 2:
        return matrix.t()
    shape = (weight.shape[1], weight.shape[0], *weight.shape[2:])
    return matrix.reshape(shape).transpose(0, 1)


class Auxiliary:
    """One target's P = B₂A₂ for one arming (B₂ ``(out, r)``, A₂ ``(r, fan_in)``, logical).

    The factors must not change between the forward and its backward (checked, as autograd
    checks W): backward rebuilds W + B₂A₂ from them.
    """

    __slots__ = ("A", "B", "linear", "output_side", "transposed", "versions")

    def __init__(
        self, B: Tensor, A: Tensor, transposed: bool, linear: bool, output_side: bool = False
    ):
        self.B, self.A = B, A
        self.transposed = transposed
        self.linear = linear  # a linear layer: f(x; B₂A₂) = (x A₂ᵀ) B₂ᵀ on the output side
        # A plain nn.Linear computes exactly x Wᵀ + b, so W + B₂A₂ need not be built: the
        # forward hook adds (x A₂ᵀ) B₂ᵀ, and autograd reaches x, B₂ and A₂ through it.
        self.output_side = output_side
        self.versions = (B._version, A._version)

    def dense(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """B₂A₂ in ``weight``'s storage layout and ``dtype`` (with autograd to the factors)."""
        return _storage(self.B.to(dtype) @ self.A.to(dtype), weight, self.transposed)

    def apply(self, weight: Tensor) -> Tensor:
        if (self.B._version, self.A._version) != self.versions:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                "inplace operation: BiLoRA's auxiliary factors changed between the forward and "
                "its backward. Call opt.step() after backward()."
            )
        with torch.no_grad():
            B, A = self.B, self.A
            if B.dtype == weight.dtype and weight.ndim == 2:  # W + B₂A₂ in one kernel
                if self.transposed:
                    return torch.addmm(weight, A.t(), B.t())
                return torch.addmm(weight, B, A)
            acc = torch.promote_types(weight.dtype, B.dtype)
            return (weight.to(acc) + self.dense(weight, acc)).to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        needs = weight.requires_grad or self.B.requires_grad or self.A.requires_grad
        if needs and torch.is_grad_enabled():
            return _LowRankWeight.apply(weight, self.B, self.A, self)
        return self.apply(weight)

    def output(self, weight: Tensor, op: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        if self.linear:  # never a weight-sized tensor: O(r·(m + n)) per token
            return F.linear(F.linear(x, self.A.to(dtype)), self.B.to(dtype))
        return op.forward(x, self.dense(weight, dtype))

    def transformed(self, weight: Tensor, plain: Tensor) -> Tensor:
        return weight + self.dense(weight, weight.dtype)


class _LowRankWeight(torch.autograd.Function):
    """W + B₂A₂: saves only the factors; G reaches W (if trainable) and B₂, A₂."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, B: Tensor, A: Tensor, aux: Auxiliary) -> Tensor:
        ctx.save_for_backward(B, A)
        ctx.transposed = aux.transposed
        return aux.apply(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        B, A = ctx.saved_tensors
        G = _logical_matrix(grad, ctx.transposed).to(B.dtype)
        grad_B = G @ A.t() if ctx.needs_input_grad[1] else None
        grad_A = B.t() @ G if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), grad_B, grad_A, None


class _AuxiliaryLaw:
    """Bi-LoRA's `flatopt._swap.Law`: each site's auxiliary factors, by site name."""

    train_only = True  # the deployable model is W + s·B₁A₁: evaluation never sees B₂A₂

    def __init__(self, factors: dict[str, tuple[Tensor, Tensor]]):
        self.factors = factors

    def perturbation(self, site: Site, weight: Tensor, unwrap: bool = False) -> Auxiliary:
        B, A = self.factors[site.name]
        owner = site.readers[0].owner
        linear = weight.ndim == 2 and not isinstance(owner, (nn.Embedding, nn.EmbeddingBag))
        output_side = linear and not unwrap and all(_plain_linear(r) for r in site.readers)
        return Auxiliary(B, A, site.transposed, linear, output_side)


def _plain_linear(reader: Any) -> bool:
    """The module called is an ``nn.Linear`` whose own forward reads its ``weight``: its
    output is x Wᵀ + b, linear in W, so P can be added to the output instead of to W."""
    module = reader.target.module
    return (
        module is reader.owner
        and reader.attr == "weight"
        and isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
    )


# -- the clip ----------------------------------------------------------------------------------


def low_rank_norm_sq(B: Tensor, A: Tensor) -> Tensor:
    """‖B A‖_F² = Σ (BᵀB ⊙ AAᵀ), in fp32 (fp64 for fp64 factors), never building B A.

    Example:
        >>> B, A = torch.full((2, 1), 2.0), torch.ones(1, 2)
        >>> low_rank_norm_sq(B, A)
        tensor(16.)
    """
    acc = torch.float64 if B.dtype == torch.float64 else torch.float32
    B, A = B.to(acc), A.to(acc)
    return ((B.t() @ B) * (A @ A.t())).sum().clamp_min(0)


@torch.no_grad()
def clip_(pairs: Iterable[tuple[Tensor, Tensor]], rho: float) -> Tensor:
    """Bi-LoRA's global clip, in place: c = √(Σ_j ‖B_j A_j‖_F²); if c > ρ, every B_j and A_j
    is multiplied by √(ρ/c). Returns c (before clipping). Nothing is read back to the host.

    Example:
        >>> B, A = torch.full((2, 1), 2.0), torch.ones(1, 2)  # ‖BA‖_F = 4
        >>> clip_([(B, A)], rho=1.0)
        tensor(4.)
        >>> low_rank_norm_sq(B, A).sqrt()
        tensor(1.)
    """
    pairs = list(pairs)
    device = pairs[0][0].device
    norm = torch.stack([low_rank_norm_sq(B, A).to(device) for B, A in pairs]).sum().sqrt()
    factor = torch.where(norm > rho, torch.sqrt(rho / norm), torch.ones_like(norm))
    for B, A in pairs:
        B.mul_(factor.to(B.device, B.dtype))
        A.mul_(factor.to(A.device, A.dtype))
    return norm


# -- the wrapper -------------------------------------------------------------------------------


def _check_rho(rho: Any, name: str = "rho") -> float:
    """ρ, the radius of the auxiliary module's Frobenius ball."""
    hint = "; the paper uses 0.05 (0.1 on some tasks)."
    return check_number(rho, name, what="rho", minimum="> 0", hint=hint)


def _check_rank(rank: Any, name: str = "rank") -> int:
    if not _is_int(rank) or rank < 1:
        raise ValueError(
            f"Invalid {name}: {rank!r}. rank, the auxiliary module's rank r₂, must be an int "
            ">= 1; the paper's task-agnostic default is 8."
        )
    return int(rank)


def _check_lr(lr: Any) -> Optional[float]:
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"Invalid lr: {lr!r}. Pass a number, or None for the optimizer's lr.")
    if not math.isfinite(float(lr)) or float(lr) <= 0:
        raise ValueError(
            f"Invalid lr: {lr!r}. The auxiliary learning rate must be a finite number > 0, or "
            "None to use the optimizer's (the paper's default)."
        )
    return float(lr)


def _factor_dtype(site: Site) -> torch.dtype:
    """The primary LoRA factors' dtype when the adapter gives them, else W's (fp32 if W is
    not floating: a quantized base)."""
    delta = site.target.delta() if site.target.delta is not None else None
    first = delta[0] if isinstance(delta, (list, tuple)) and delta else delta
    if isinstance(first, LowRank) and first.B.is_floating_point():
        return first.B.dtype
    weight = site.readers[0].read()
    return weight.dtype if weight.is_floating_point() else torch.float32


def _initial_factors(site: Site, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """LoRA's initialisation: B₂ = 0 and A₂ ~ U(−1/√n, 1/√n) (Kaiming-uniform with a = √5,
    as peft's lora_A), from a private generator seeded by (seed, site index)."""
    rows, fan_in = site.logical_shape
    weight = site.readers[0].read()
    device, dtype = weight.device, _factor_dtype(site)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0, 0, site.index))
    bound = 1 / math.sqrt(max(fan_in, 1))
    A = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    B = torch.zeros(rows, rank, dtype=dtype, device=device, requires_grad=True)
    return B, A.to(device, dtype).requires_grad_()


class _BiState(_State):
    """`FlatPerturb`'s state with the auxiliary module as its law."""

    def __init__(self, model: Any, adapters: tuple, settings: dict[str, Any]):
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.rho = 0.05
        super().__init__(model, adapters, settings)

    def describe(self) -> str:
        return f"BiLoRA(rho={self.rho}, num_steps={self.step}, auto={self.auto})"

    def active(self) -> bool:
        return True  # a zero B₂ still needs its ascent gradient

    def law(self) -> _AuxiliaryLaw:
        return _AuxiliaryLaw(self.factors)

    def arm(self, auto: bool) -> None:
        self.check_model()
        sites = [site for site in self.sites if site.name in self.factors]
        self.arming = Arming(sites, self.law(), auto=auto)
        self.draw += 1


def _with_bilora_entry(opt: BiLoRA, state_dict: dict[str, Any]) -> None:
    """The state-dict post-hook that adds the ``"bilora"`` entry (before any user's hook)."""
    state = opt._state
    state_dict["bilora"] = {
        "rho": state.rho,
        "rank": opt._rank,
        "lr": opt._aux_lr,
        "factors": {
            name: {"B": B.detach().clone(), "A": A.detach().clone()}
            for name, (B, A) in state.factors.items()
        },
    }


class BiLoRA(FlatPerturb):
    """Wrap ``optimizer`` so each step is Bi-LoRA's: descent on LoRA, ascent on an auxiliary
    low-rank perturbation B₂A₂ of every target, one forward and backward, then a global clip.

    Every target found in ``model`` (as by `FlatPerturb`) gets B₂ ``(out, rank)`` and A₂
    ``(rank, fan_in)``. Training-mode forwards see W + s·B₁A₁ + B₂A₂; eval-mode forwards see
    W + s·B₁A₁ only, whether armed or not. W is never written. After each ``step()``, c =
    √(Σ ‖B₂A₂‖_F²) over all targets; if c > ρ every B₂ and A₂ is multiplied by √(ρ/c).

    Decisions the paper leaves open (its code could not be read), and why:

    - **Initialisation** is LoRA's: B₂ = 0 and A₂ Kaiming-uniform (a = √5, as peft's lora_A),
      drawn from a private generator seeded by ``seed``. Step 0 is then plain LoRA, and B₂
      still moves: its gradient G·A₂ᵀ is not zero. (B₂ = A₂ = 0 would never move.)
    - **No scaling** on B₂A₂: ρ then bounds exactly what the forward sees.
    - **Ascent** is an extra param group of the wrapped optimizer with ``maximize=True``,
      learning rate ``lr`` (default: the optimizer's), weight decay 0: one optimizer, so the
      auxiliary lr follows the same LR scheduler, as the paper's shared lr implies. Build
      schedulers on the BiLoRA (after it), so they see that group.
    - **No dropout** on the auxiliary branch: it is a weight perturbation.
    - **Under torch.distributed** the auxiliary gradients are averaged over the ranks
      before the step (they are not the model's parameters, so DDP does not reduce them).

    Everything else is `FlatPerturb`'s: `perturb`/`restore`, ``with opt.perturbed():``,
    ``step(closure)``, ``auto=True`` for trainers, gradient accumulation (every micro-batch of
    a step sees the same B₂A₂), AMP, activation checkpointing, FSDP2, adapters and the
    output-side path for quantized bases. DeepSpeed is not supported.

    The auxiliary factors belong to the wrapper: ``model.state_dict()``, ``torch.save(model)``
    and peft's ``save_pretrained``/``merge_and_unload`` never see them. ``state_dict()`` holds
    them (``"bilora"``) with their optimizer state (the extra group), so loading it into a
    fresh BiLoRA continues bit for bit.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the trainable parameters whose param
            groups accept ``maximize`` (SGD, Adam, AdamW, …).
        model: the ``nn.Module`` to scan for LoRA layers, or an iterable of modules.
        rho: ρ, the radius of the global Frobenius ball of the auxiliary modules (> 0).
        rank: r₂, the auxiliary rank (>= 1).
        lr: the auxiliary learning rate; None for the optimizer's.
        seed: seeds the initialisation of A₂; None draws one from torch's default generator.
        adapters: extra adapters, as in `FlatPerturb`.
        auto: arm from the model's training forwards (drop-in mode, for trainers).

    Raises:
        TypeError: ``optimizer`` is not an Optimizer, its groups take no ``maximize``, or an
            argument has the wrong type.
        ValueError: a bad ``rho``, ``rank``, ``lr`` or ``seed``, or no LoRA layer was found.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], rank=2)
        >>> inner = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        >>> opt = BiLoRA(inner, net, rho=0.05, rank=4, seed=0)
        >>> with opt.perturbed():
        ...     net(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> bool(opt.aux_norm() <= 0.05 + 1e-6)
        True
    """

    _state_type = _BiState
    _state: _BiState

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: Union[nn.Module, Iterable[nn.Module]],
        *,
        rho: float = 0.05,
        rank: int = 8,
        lr: Optional[float] = None,
        seed: Optional[int] = None,
        adapters: Union[Adapter, Iterable[Adapter]] = (),
        auto: bool = False,
    ):
        self._build(optimizer, model, rho, rank, lr, seed, adapters, auto, factors=None)

    def _build(self, optimizer, model, rho, rank, lr, seed, adapters, auto, factors) -> None:
        rho, rank, lr = _check_rho(rho), _check_rank(rank), _check_lr(lr)
        if isinstance(optimizer, torch.optim.Optimizer) and "maximize" not in optimizer.defaults:
            raise TypeError(
                f"{type(optimizer).__name__} has no maximize option; BiLoRA's auxiliary factors "
                "ascend through a param group with maximize=True. Use SGD, Adam, AdamW, or "
                "another torch optimizer that takes maximize."
            )
        super().__init__(optimizer, model, sigma=0.0, schedule="constant", seed=seed,
                         adapters=adapters, auto=auto)  # fmt: skip
        state = self._state
        roots, _ = state.roots()
        if _zero.managed(roots):
            raise TypeError(
                "BiLoRA does not support DeepSpeed ZeRO: its engine steps flat partitions "
                "that the auxiliary factors are not part of. Use FlatPerturb, or DDP/FSDP2."
            )
        state.rho = rho
        self._rank, self._aux_lr = rank, lr
        if factors is None:
            factors = {site.name: _initial_factors(site, rank, state.seed) for site in state.sites}
            group: dict[str, Any] = {"params": [t for pair in factors.values() for t in pair]}
            group["maximize"] = True
            group["lr"] = lr if lr is not None else self._inner.defaults["lr"]
            if "weight_decay" in self._inner.defaults:
                group["weight_decay"] = 0.0  # the clip bounds the adversary; decay would too
            self._inner.add_param_group(group)
        state.factors = dict(factors)
        hooks = self._optimizer_state_dict_post_hooks
        self.register_state_dict_post_hook(_with_bilora_entry)
        hooks.move_to_end(next(reversed(hooks)), last=False)

    # -- views -----------------------------------------------------------------------------

    @property
    def rho(self) -> float:
        """ρ, the radius of the auxiliary modules' global Frobenius ball."""
        return self._state.rho

    @property
    def aux_factors(self) -> dict[str, LowRank]:
        """The auxiliary module of each target, ``LowRank(B₂, A₂)`` by target name (live)."""
        return {name: LowRank(B, A) for name, (B, A) in self._state.factors.items()}

    @torch.no_grad()
    def aux_norm(self) -> Tensor:
        """c = √(Σ_targets ‖B₂A₂‖_F²), a 0-dim tensor (no host read)."""
        pairs = self._state.factors.values()
        device = next(iter(pairs))[0].device
        return torch.stack([low_rank_norm_sq(B, A).to(device) for B, A in pairs]).sum().sqrt()

    # -- the step --------------------------------------------------------------------------

    def _aux_params(self) -> list[Tensor]:
        return [t for pair in self._state.factors.values() for t in pair]

    def _average_aux_grads(self) -> None:
        """Under torch.distributed, average the auxiliary gradients over the ranks."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        params = self._aux_params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """`FlatPerturb.step` (descent on LoRA, ascent on B₂A₂), then the global clip.

        Returns:
            The closure's loss, or None.
        """
        if closure is None:
            self._average_aux_grads()
        else:
            closure = _Averaged(closure, self)
        flat_step = getattr(FlatPerturb.step, "__wrapped__", FlatPerturb.step)  # hooks ran
        loss = flat_step(self, closure)
        clip_(self._state.factors.values(), self._state.rho)
        return loss

    # -- checkpoints and copies ------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict`: the wrapped optimizer's state, flatopt's and the auxiliary
        factors, checked whole first (nothing changes on error). A checkpoint's ρ replaces
        this wrapper's, with a warning when they differ.

        Raises:
            ValueError: no ``"bilora"`` entry, another rank, or factors of other shapes.
            TypeError: ``state_dict`` is not a dict.
        """
        state_dict = self._check_mapping(state_dict, "state_dict")
        own = state_dict.get("bilora")
        if not isinstance(own, dict) or not isinstance(own.get("factors"), dict):
            raise ValueError(
                "state_dict has no valid 'bilora' entry; load a state dict written by "
                "BiLoRA.state_dict(). Nothing was loaded."
            )
        rho = _check_rho(own.get("rho"), name="state_dict['bilora']['rho']")
        if own.get("rank") != self._rank:
            raise ValueError(
                f"The checkpoint's auxiliary rank is {own.get('rank')!r}, this BiLoRA's "
                f"{self._rank}. Build it with rank={own.get('rank')!r}. Nothing was loaded."
            )
        saved, factors = own["factors"], self._state.factors
        if set(saved) != set(factors):
            raise ValueError(
                f"The checkpoint's auxiliary modules are for {sorted(saved)}, this BiLoRA's "
                f"targets are {sorted(factors)}. Nothing was loaded."
            )
        for name, (B, A) in factors.items():
            for label, ours in (("B", B), ("A", A)):
                theirs = saved[name].get(label) if isinstance(saved[name], dict) else None
                if not isinstance(theirs, Tensor) or theirs.shape != ours.shape:
                    raise ValueError(
                        f"state_dict['bilora']['factors'][{name!r}][{label!r}] is not a tensor "
                        f"of shape {tuple(ours.shape)}. Nothing was loaded."
                    )
        rest = {key: value for key, value in state_dict.items() if key != "bilora"}
        super().load_state_dict(rest)
        with torch.no_grad():
            for name, (B, A) in factors.items():
                B.copy_(saved[name]["B"])
                A.copy_(saved[name]["A"])
        if rho != self._state.rho:
            warnings.warn(
                f"load_state_dict() replaced rho={self._state.rho} by the checkpoint's {rho}.",
                stacklevel=2,
            )
            self._state.rho = rho

    def __getstate__(self) -> dict[str, Any]:
        saved = super().__getstate__()
        saved["bilora"] = {
            "rho": self._state.rho,
            "rank": self._rank,
            "lr": self._aux_lr,
            "factors": self._state.factors,
        }
        return saved

    def __setstate__(self, saved: dict[str, Any]) -> None:
        own, settings = saved["bilora"], saved["settings"]
        options = (own["rho"], own["rank"], own["lr"], settings["seed"], saved["adapters"])
        self._build(saved["optimizer"], saved["model"], *options, settings["auto"], own["factors"])
        for key, value in saved["progress"].items():
            setattr(self._state, key, value)

    def __repr__(self) -> str:
        state = self._state
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return (
            f"BiLoRA (\n"
            f"  rho: {state.rho:g}, rank: {self._rank}, lr: {self._aux_lr}, auto: {state.auto}\n"
            f"  num_steps: {state.step}, perturbed: {self.is_perturbed}\n"
            f"  targets: {len(state.sites)} layers\n"
            f"  optimizer:\n{inner}\n)"
        )


class _Averaged:
    """A closure whose auxiliary gradients are averaged over the ranks once it has run."""

    def __init__(self, closure: Callable[[], Any], opt: BiLoRA):
        self.closure, self.opt = closure, opt

    def __call__(self) -> Any:
        loss = self.closure()
        self.opt._average_aux_grads()
        return loss
