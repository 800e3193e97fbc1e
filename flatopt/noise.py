"""The Flat-LoRA noise law as pure functions of (weight, delta, sigma, seed, step).

Nothing here holds state or touches a model, so every piece can be tested on bare tensors.

For a weight W' = W + ΔW read as an ``m × n`` matrix (rows are output features),

    ε_ij = σ_t · ‖W'_i,:‖₂ / √n · z_ij,    z_ij ~ N(0, 1) i.i.d.,

with σ_t = σ · f(t) and f the schedule. ``z`` comes from a private ``torch.Generator`` seeded
by `derive_seed`, so the same ε can be regenerated bit for bit whenever it is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "LowRank",
    "derive_seed",
    "draw_noise",
    "noise_std",
    "perturbed_weight",
    "row_dim",
    "row_norms",
    "schedule_factor",
]

SCHEDULES = ("cosine", "linear", "constant")

Schedule = Union[str, Callable[[int], float]]


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ΔW = ``scale · B @ A`` in the logical ``(out, fan_in)`` layout.

    Adapters return this from ``Target.delta`` so the row norms of W + ΔW can be computed
    without ever materialising ``B @ A``.

    Args:
        B: ``(out_features, r)``; extra trailing dims are flattened.
        A: ``(r, fan_in)``; extra trailing dims (a conv kernel) are flattened.
        scale: the LoRA scaling, e.g. ``alpha / r``.

    Example:
        >>> B, A = torch.zeros(4, 2), torch.randn(2, 3)
        >>> LowRank(B, A, scale=0.5).dense().shape
        torch.Size([4, 3])
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0

    def dense(self) -> Tensor:
        """Return ``scale · B @ A`` as an ``(out, fan_in)`` matrix (slow; for references)."""
        B = self.B.reshape(self.B.shape[0], -1)
        A = self.A.reshape(self.A.shape[0], -1)
        return self.scale * (B @ A)


Delta = Union[Tensor, LowRank, Sequence[LowRank], None]


def schedule_factor(schedule: Schedule, step: int, total_steps: int | None) -> float:
    """Return f(t), the factor σ_t / σ at optimizer step ``step`` (0-based).

    ``"cosine"`` is the paper's ½·(1 − cos(π·min(t, T)/T)): exactly 0 at t = 0 and 1 from
    t = T on. ``"linear"`` is min(t, T)/T, ``"constant"`` is 1, and a callable is used as is.

    Args:
        schedule: ``"cosine"``, ``"linear"``, ``"constant"`` or a callable ``step -> factor``.
        step: the number of completed optimizer steps.
        total_steps: T; required by the ramps.

    Raises:
        ValueError: unknown schedule, a ramp without ``total_steps``, or a callable that
            returns a negative or non-finite factor.

    Example:
        >>> schedule_factor("cosine", 0, 100), schedule_factor("cosine", 100, 100)
        (0.0, 1.0)
    """
    if callable(schedule):
        factor = float(schedule(step))
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(
                f"schedule({step}) returned {factor!r}; a schedule callable must return a "
                "finite factor >= 0 (it multiplies sigma)."
            )
        return factor
    if schedule == "constant":
        return 1.0
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {schedule!r}; use one of {SCHEDULES} or a callable step -> factor."
        )
    if total_steps is None or total_steps < 1:
        raise ValueError(
            f"schedule={schedule!r} needs total_steps >= 1 (the length of the ramp), got "
            f"{total_steps!r}."
        )
    progress = min(step, total_steps) / total_steps
    if schedule == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, step: int, draw: int = 0, target: int = 0, rank: int = 0) -> int:
    """Mix (seed, step, draw, target, rank) into one 63-bit generator seed.

    Every input bit reaches every output bit (splitmix64), so neighbouring steps and targets get
    unrelated streams. Note that torch's CPU generator keeps only the low 32 bits of a seed.

    Example:
        >>> derive_seed(0, 1) != derive_seed(0, 2)
        True
    """
    h = _splitmix64(seed & _MASK64)
    for value in (step, draw, target, rank):
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


def row_dim(weight: Tensor, transposed: bool = False) -> int:
    """Return the storage dim that holds the logical rows (output features) of ``weight``.

    Example:
        >>> row_dim(torch.empty(3, 4)), row_dim(torch.empty(4, 3), transposed=True)
        (0, 1)
    """
    return 1 if transposed else 0


def _accumulate_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _logical_matrix(weight: Tensor, transposed: bool) -> Tensor:
    """``weight`` as an ``(out, fan_in)`` matrix (a view where the layout allows)."""
    w = weight.transpose(0, 1) if transposed else weight
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def row_norms(
    weight: Tensor,
    delta: Delta = None,
    *,
    transposed: bool = False,
    base_sq: Tensor | None = None,
) -> Tensor:
    """Return ‖W'_i,:‖₂ per logical row of W' = W + ΔW, in fp32 (fp64 for fp64 weights).

    A `LowRank` delta (or a list of them) uses the identity
    ‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·B_i·(W·Aᵀ)_i + s²·B_i·(A·Aᵀ)·B_iᵀ, which costs
    O(m·n·r) and never builds ``B @ A``. A tensor delta is in the weight's storage layout.

    Args:
        weight: the base weight in its storage layout.
        delta: None, a tensor like ``weight``, a `LowRank` or a sequence of them.
        transposed: the weight is stored as ``(fan_in, out)``.
        base_sq: optional cached ‖W_i‖², to skip the pass over W.

    Example:
        >>> W = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> row_norms(W)
        tensor([5., 1.])
    """
    acc = _accumulate_dtype(weight)
    dim = row_dim(weight, transposed)
    other = [d for d in range(weight.ndim) if d != dim]
    if isinstance(delta, Tensor):
        merged = weight.to(acc) + delta.to(acc)
        return torch.linalg.vector_norm(merged, dim=other)
    if base_sq is None:
        base_sq = torch.linalg.vector_norm(weight, dim=other, dtype=acc).square()
    factors = [delta] if isinstance(delta, LowRank) else list(delta or ())
    if not factors:
        return base_sq.sqrt()
    B = torch.cat([f.scale * f.B.reshape(f.B.shape[0], -1).to(acc) for f in factors], dim=1)
    A = torch.cat([f.A.reshape(f.A.shape[0], -1) for f in factors], dim=0)
    # W·Aᵀ in the weight's own precision: no weight-sized upcast of W.
    if transposed and weight.ndim == 2:
        WA = (A.to(weight.dtype) @ weight).t().to(acc)
    else:
        WA = (_logical_matrix(weight, transposed) @ A.to(weight.dtype).t()).to(acc)
    A = A.to(acc)
    cross = 2 * (B * WA).sum(1)
    quad = ((B @ (A @ A.t())) * B).sum(1)
    return (base_sq + cross + quad).clamp_min(0).sqrt()


def noise_std(
    weight: Tensor,
    delta: Delta = None,
    sigma: float = 0.05,
    *,
    transposed: bool = False,
    base_sq: Tensor | None = None,
) -> Tensor:
    """Return the per-row noise standard deviation σ·‖W'_i‖/√n (a constant: no gradient).

    Example:
        >>> noise_std(torch.ones(2, 4), sigma=0.1)
        tensor([0.1000, 0.1000])
    """
    rows = weight.shape[row_dim(weight, transposed)]
    fan_in = weight.numel() // max(rows, 1)
    norms = row_norms(weight, delta, transposed=transposed, base_sq=base_sq)
    return norms.mul_(sigma / math.sqrt(max(fan_in, 1)))


def _broadcast(std: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    shape = [1] * weight.ndim
    shape[row_dim(weight, transposed)] = -1
    return std.view(shape)


def _standard_normal(weight: Tensor, generator: torch.Generator, seed: int) -> Tensor:
    generator.manual_seed(seed)
    z = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return z.normal_(generator=generator)


@torch.no_grad()
def perturbed_weight(
    weight: Tensor,
    std: Tensor,
    *,
    transposed: bool = False,
    generator: torch.Generator,
    seed: int,
) -> Tensor:
    """Return a new tensor W + ε in W's dtype and device; W itself is never written.

    The noise is drawn straight into the output buffer and W is fused in with one ``addcmul``,
    so the call allocates exactly one weight-sized tensor. Calling it again with the same
    generator device and seed returns the same bits.

    Example:
        >>> W, g = torch.zeros(2, 3), torch.Generator()
        >>> a = perturbed_weight(W, torch.ones(2), generator=g, seed=1)
        >>> torch.equal(a, perturbed_weight(W, torch.ones(2), generator=g, seed=1))
        True
    """
    out = _standard_normal(weight, generator, seed)
    return torch.addcmul(weight, out, _broadcast(std, weight, transposed), out=out)


@torch.no_grad()
def draw_noise(
    weight: Tensor,
    std: Tensor,
    *,
    transposed: bool = False,
    generator: torch.Generator,
    seed: int,
) -> Tensor:
    """Return ε itself, in fp32 (fp64 for fp64 weights): the slow, explicit form of the law.

    It uses the same ``z`` as `perturbed_weight`; tests and references use it to build
    W + ε by hand.

    Example:
        >>> eps = draw_noise(torch.zeros(2, 3), torch.ones(2), generator=torch.Generator(), seed=1)
        >>> eps.shape
        torch.Size([2, 3])
    """
    z = _standard_normal(weight, generator, seed)
    return z.to(std.dtype) * _broadcast(std, weight, transposed)
