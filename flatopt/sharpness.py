"""``sharpness``: how much the loss rises, on average, under Flat-LoRA's own noise law."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from ._arming import Arming, Generators, build_sites, drop_hooks, find_slot
from .adapters import Adapter, find_targets
from .noise import seed_of_target, step_seed
from .perturb import check_sigma

__all__ = ["Sharpness", "sharpness"]


@dataclass(frozen=True)
class Sharpness:
    """The result of `sharpness`.

    Attributes:
        mean: E_ε[L(W' + ε)] − L(W'), averaged over the noise samples.
        std: the standard deviation of that increase over the samples.
        stderr: ``std / √samples``, the uncertainty of ``mean``.
        clean_loss: L(W'), the unperturbed loss.
        increases: the increase for each noise sample.
        sigma: the σ the noise was drawn with.
    """

    mean: float
    std: float
    stderr: float
    clean_loss: float
    increases: tuple[float, ...]
    sigma: float

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.stderr:.2g} (σ={self.sigma:g}, n={len(self.increases)})"


def _perturbed_increases(
    sites: list, sigma: float, seed: int, samples: int, loss_fn: Any, batches: list, clean: float
) -> list[float]:
    """The loss increase under each of ``samples`` draws (the std is computed once)."""
    stds: dict = {}
    generators = Generators()
    increases = []
    for draw in range(samples):
        prefix = step_seed(seed, 0, draw)
        arming = Arming(sites, sigma, lambda i, p=prefix: seed_of_target(p, i), stds, generators)
        try:
            increases.append(_mean_loss(loss_fn, batches) - clean)
        finally:
            arming.disarm()
    return increases


def _mean_loss(loss_fn: Callable[[Any], Tensor], batches: list[Any]) -> float:
    return sum(float(loss_fn(batch)) for batch in batches) / len(batches)


@torch.no_grad()
def sharpness(
    model: Union[nn.Module, Iterable[nn.Module]],
    loss_fn: Callable[[Any], Tensor],
    batches: Iterable[Any],
    *,
    sigma: float = 0.05,
    samples: int = 8,
    seed: int = 0,
    adapters: Iterable[Adapter] = (),
    eval_mode: bool = True,
) -> Sharpness:
    """Measure the expected loss increase E_ε[L(W' + ε)] − L(W') under the Flat-LoRA law.

    Each of ``samples`` draws perturbs every target with ε_ij = σ·‖W'_i‖/√n·z_ij (σ fixed, no
    schedule) and evaluates the mean of ``loss_fn`` over ``batches``. A flat solution has a
    small increase; it is the quantity Flat-LoRA's objective penalises. The model's weights are
    never written, and the global RNG is not used.

    Args:
        model: the model (or iterable of modules) to scan for targets, as in FlatPerturb.
        loss_fn: called as ``loss_fn(batch)`` and returns a scalar loss; it runs the model.
        batches: the batches to average over (held-out data shows generalisation).
        sigma: the relative noise scale.
        samples: the number of noise draws.
        seed: the root seed of the draws.
        adapters: extra adapters, as in FlatPerturb.
        eval_mode: measure with the model in eval mode (no dropout); its modes are put back.

    Returns:
        The mean increase, its spread and the clean loss, as a `Sharpness`.

    Raises:
        ValueError: a negative ``sigma``, bad ``samples``, no batches, or no target in the model.
        TypeError: a non-numeric ``sigma``.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 1)), ["0"], rank=2)
        >>> x, y = torch.randn(32, 8), torch.randn(32, 1)
        >>> loss = lambda batch: torch.nn.functional.mse_loss(net(batch[0]), batch[1])
        >>> result = sharpness(net, loss, [(x, y)], sigma=0.1, samples=4)
        >>> result.mean >= -1.0
        True
    """
    sigma = check_sigma(sigma)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"Invalid samples: {samples!r}. Pass a positive int, e.g. samples=8.")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one batch to evaluate the loss on.")
    modules = [model] if isinstance(model, nn.Module) else list(model)
    modes = [(m, m.training) for root in modules for m in root.modules()]
    hooked = {id(m) for m, _ in modes if find_slot(m) is not None}
    try:
        sites = build_sites(find_targets(modules, adapters))
        if eval_mode:
            for root in modules:
                root.eval()
        clean = _mean_loss(loss_fn, batches)
        increases = _perturbed_increases(sites, sigma, seed, samples, loss_fn, batches, clean)
    finally:
        for module, training in modes:
            module.training = training
        for module, _ in modes:  # leave the model exactly as found: no new hooks
            if id(module) not in hooked and find_slot(module) is not None:
                drop_hooks(module)
    std = statistics.stdev(increases) if samples > 1 else 0.0
    return Sharpness(
        mean=statistics.fmean(increases),
        std=std,
        stderr=std / math.sqrt(samples),
        clean_loss=clean,
        increases=tuple(increases),
        sigma=sigma,
    )
