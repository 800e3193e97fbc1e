"""The Flat-LoRA law in one place: σ_t, the seeds, each site's std, and the noise itself.

At optimizer step t every target gets ε_ij = σ_t · ‖W'_i,:‖ / √n · z_ij with σ_t = σ · f(t)
(`sigma_t`), z drawn from a private generator seeded by (seed, t, draw, target index, rank)
(`FlatLoRA.seed_of`), and the std computed from the tensor the forward reads (`site_std`).
`FlatLoRA` is the `flatopt._swap.Law` that `FlatPerturb` and `flatopt.sharpness` arm; `Noise`
is its `flatopt._swap.Perturbation`, which regenerates ε from the seed rather than storing it.
The pure maths lives in `flatopt.noise`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ._generators import Generators, _parallel
from ._output import OutputNoise, dequantized, is_dtensor, is_plain
from ._sites import Site, _unwrap
from .noise import (
    Schedule,
    _broadcast,
    _perturbed_weight,
    _row_norms,
    draw_noise,
    schedule_factor,
    seed_of_target,
    std_scale,
    step_seed,
)

__all__ = ["FlatLoRA", "Noise", "rank", "sigma_t", "site_std"]


def rank() -> int:
    """This process's rank under torch.distributed (0 without it): it seeds per-rank noise."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def sigma_t(sigma: float, schedule: Schedule, step: int, total_steps: Optional[int]) -> float:
    """σ_t = σ · f(t), the noise scale at optimizer step ``step``."""
    return sigma * schedule_factor(schedule, step, total_steps)


def _full(delta: Any, unwrap: bool = False) -> Any:
    """ΔW with any factor still sharded (a DTensor: its own FSDP unit) gathered whole, and
    with ``unwrap`` the plain tensors inside torch.func's wrappers."""
    if isinstance(delta, (list, tuple)):
        return [_full(d, unwrap) for d in delta]
    if is_dtensor(delta):
        return delta.full_tensor()
    if unwrap and isinstance(delta, Tensor):
        return _unwrap(delta)
    B, A = getattr(delta, "B", None), getattr(delta, "A", None)
    if is_dtensor(B) or is_dtensor(A) or (unwrap and B is not None):
        return type(delta)(_full(B, unwrap), _full(A, unwrap), delta.scale)
    return delta


def site_std(site: Site, sigma: float, weight: Tensor, unwrap: bool = False) -> Tensor:
    """The per-row noise std σ·‖W'_i‖/√n, from ``weight`` (the tensor the forward reads).

    ``unwrap``: inside torch.func transforms, read the plain tensors in their wrappers."""
    target = site.target
    grad = torch.is_grad_enabled()
    if grad:  # the row norms are constants (cheaper than a torch.no_grad() block)
        torch._C._set_grad_enabled(False)
    try:
        delta = _full(target.delta(), unwrap) if target.delta is not None else None
        dense = weight if is_plain(weight) else dequantized(weight)
        # Recomputed from W at every step, never cached: W may change in ways no version
        # counter sees (writes through .data, merges, a replaced Parameter).
        scale = std_scale(dense, sigma, site.transposed)
        return _row_norms(dense, delta, site.transposed, None, scale)
    finally:
        if grad:
            torch._C._set_grad_enabled(True)


class Noise:
    """One weight's noise for one draw: its std, seed, generator, layout and kept row."""

    __slots__ = ("generator", "keep", "scale", "seed", "std", "transposed")
    output_side = False  # W + ε is built; the output side is for quantized weights only

    def __init__(
        self,
        std: Tensor,
        seed: int,
        generator: torch.Generator,
        weight: Tensor,
        transposed: bool,
        keep: Optional[int] = None,
    ):
        self.std = std
        self.seed = seed
        self.generator = generator
        self.transposed = transposed
        self.keep = keep
        self.scale = _broadcast(std, weight, transposed)  # the std in W's storage layout

    def epsilon(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """ε itself, drawn in ``dtype``: for quantized weights, which have no float dtype."""
        eps = draw_noise(
            weight,
            self.std,
            transposed=self.transposed,
            generator=self.generator,
            seed=self.seed,
            dtype=dtype,
            keep=self.keep,
        )
        return eps.to(dtype)

    def forward(self, weight: Tensor) -> Tensor:
        """W + ε; for a trainable W (a dense target) the gradient is the one taken at W + ε."""
        if weight.requires_grad and torch.is_grad_enabled():
            return _PerturbedWeight.apply(weight, self)
        return self.apply(weight)

    def output(self, weight: Tensor, op: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        """f(x; ε), with ε regenerated from the seed in backward."""
        return OutputNoise.apply(x, lambda d: self.epsilon(weight, d), op, dtype)

    def transformed(self, weight: Tensor, plain: Tensor) -> Tensor:
        """W + ε inside torch.func: drawn outside the transforms; differentiable when W itself
        is a transform's input."""
        with torch._C._DisableFuncTorch():
            if plain is weight:
                return self.apply(plain)
            eps = self.epsilon(plain, plain.dtype)
        return weight + eps

    def apply(self, weight: Tensor) -> Tensor:
        """W + ε, a new tensor; grad mode must be off if W requires grad."""
        return _perturbed_weight(
            weight, self.scale, self.generator, self.seed, _parallel, self.keep
        )


class _PerturbedWeight(torch.autograd.Function):
    """W + ε for a trainable W: the gradient reaching W is the one taken at W + ε."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, noise: Noise) -> Tensor:
        return noise.apply(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class FlatLoRA:
    """The law of one draw: σ_t, the seed prefix of (seed, step, draw) and the rank.

    ``stds`` caches each site's std by index; the caller shares it between the draws of one
    optimizer step (resample="call" draws again with the same row norms).
    """

    train_only = False  # explicitly armed, an eval-mode forward sees W + ε too

    def __init__(
        self,
        sigma: float,
        seed: int,
        step: int,
        draw: int,
        rank: int,
        stds: dict[int, Tensor],
        generators: Generators,
    ):
        self.sigma = sigma
        self.prefix = step_seed(seed, step, draw)
        self.rank = rank
        self.stds = stds
        self.generators = generators

    def seed_of(self, index: int) -> int:
        return seed_of_target(self.prefix, index, self.rank)

    def perturbation(self, site: Site, weight: Tensor, unwrap: bool = False) -> Noise:
        std = self.stds.get(site.index)
        if std is None:
            std = self.stds[site.index] = site_std(site, self.sigma, weight, unwrap)
        generator = self.generators(weight.device)
        keep = site.readers[0].keep
        return Noise(std, self.seed_of(site.index), generator, weight, site.transposed, keep)
