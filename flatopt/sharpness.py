"""``sharpness``: how much the loss rises, on average, under Flat-LoRA's own noise law."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union, overload

import torch
from torch import Tensor, nn

from ._arming import Arming, Generators, _Slot, build_sites, drop_hooks, find_slot
from ._flat import FlatLoRA
from .adapters import Adapter, find_targets
from .perturb import check_sigma

__all__ = ["Sharpness", "sharpness"]


@dataclass(frozen=True)
class Sharpness:
    """The result of `sharpness` at one σ.

    Attributes:
        mean: E_ε[L(W' + ε)] − L(W'), averaged over the noise samples.
        std: the standard deviation of that increase over the samples.
        stderr: ``std / √samples``, the uncertainty of ``mean``.
        clean_loss: L(W'), the unperturbed loss.
        increases: the increase for each noise sample.
        sigma: the σ the noise was drawn with.
        seed: the root seed of the draws. Two measurements with the same seed, on models with
            the same targets, meet the same draws of z: compare them draw by draw.

    Example:
        >>> result = Sharpness(0.2, 0.08, 0.04, 1.0, (0.1, 0.2, 0.3, 0.2), sigma=0.1)
        >>> low, high = result.ci()  # 0.2 ± 3.182 · 0.04, Student's t with 3 df
        >>> round(low, 3), round(high, 3)
        (0.073, 0.327)
    """

    mean: float
    std: float
    stderr: float
    clean_loss: float
    increases: tuple[float, ...]
    sigma: float
    seed: int = 0

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """The t-based confidence interval of `mean` over the noise draws.

        It covers the Monte Carlo error of the draws only: the model and the batches are fixed.
        With one sample the interval is (-inf, inf).

        Args:
            level: the coverage, in (0, 1).

        Raises:
            ValueError: ``level`` outside (0, 1).
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"Invalid level: {level!r}. Pass a coverage in (0, 1), e.g. 0.95.")
        samples = len(self.increases)
        if samples < 2:
            return -math.inf, math.inf
        half = _t_quantile(level, samples - 1) * self.stderr
        return self.mean - half, self.mean + half

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.stderr:.2g} (σ={self.sigma:g}, n={len(self.increases)})"


def _t_quantile(level: float, df: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom.

    Solves P(|T| ≤ t) = level by bisection on the exact finite-sum CDF for integer ``df``
    (Abramowitz & Stegun 26.7.3–4), so no scipy is needed.

    Example:
        >>> round(_t_quantile(0.95, 9), 3)
        2.262
    """

    def inside(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        cos2, sin = math.cos(theta) ** 2, math.sin(theta)
        if df % 2:
            term, total = 1.0, 1.0 if df > 1 else 0.0
            for k in range(1, (df - 1) // 2):
                term *= cos2 * (2 * k) / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + sin * math.cos(theta) * total)
        term = total = 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total

    low, high = 0.0, 1.0
    while inside(high) < level:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if inside(mid) < level else (low, mid)
    return (low + high) / 2


def _perturbed_increases(
    sites: list, sigma: float, seed: int, samples: int, loss_fn: Any, batches: list, clean: float
) -> tuple[list[float], int]:
    """The loss increase under each of ``samples`` draws (the std is computed once), and how
    many target forwards ran perturbed. The one place that drives flatopt's arming."""
    stds: dict = {}
    generators = Generators()
    increases, calls = [], 0
    for draw in range(samples):
        arming = Arming(sites, FlatLoRA(sigma, seed, 0, draw, 0, stds, generators))
        try:
            increases.append(_mean_loss(loss_fn, batches) - clean)
        finally:
            arming.disarm()
        calls += arming.calls
    return increases, calls


def _mean_loss(loss_fn: Callable[[Any], Tensor], batches: list[Any]) -> float:
    return sum(_loss_value(loss_fn(batch)) for batch in batches) / len(batches)


def _loss_value(loss: Any) -> float:
    """One batch's loss as a float; a tensor must hold a single number."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)}; sharpness needs one "
                "scalar loss per batch. Reduce it inside loss_fn, e.g. return loss.mean() (or "
                "a loss function with its default reduction='mean')."
            )
        return float(loss)
    try:
        return float(loss)
    except (TypeError, ValueError):
        raise TypeError(
            f"loss_fn returned {type(loss).__name__}; sharpness needs one scalar loss per batch. "
            "Return the loss tensor itself, e.g. model(**batch).loss."
        ) from None


def _slots(modules: list[nn.Module]) -> list[_Slot]:
    """The slots of flatopt's hooks already on the modules, each once."""
    found: dict[int, _Slot] = {}
    for root in modules:
        for module in root.modules():
            slot = find_slot(module)
            if slot is not None:
                found.setdefault(id(slot), slot)
    return list(found.values())


def _check_unperturbed(slots: list[_Slot]) -> None:
    """Refuse to measure while a FlatPerturb has its noise armed on the model."""
    for slot in slots:
        owner = slot.owner() if slot.owner is not None else None
        if owner is not None and owner.arming is not None and owner.arming.auto:
            name = next(
                (s.name for s in owner.sites for r in s.readers if r.slot is slot), "a target"
            )
            raise RuntimeError(
                "sharpness() was called inside a step of a FlatPerturb(auto=True): the noise "
                f"of its targets (e.g. {name!r}) is armed from the step's first training "
                "forward until opt.step(). Call sharpness() after opt.step(), or before the "
                "step's first training forward, so that it measures the clean model."
            )
        for swap in slot.swaps.values():
            raise RuntimeError(
                f"sharpness() was called while {swap.site.name!r} is perturbed (between "
                "opt.perturb() and opt.restore(), inside `with opt.perturbed():`, or inside "
                "another sharpness() call). Call it after opt.restore(), so that it measures "
                "the clean model."
            )


def _set_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put each module in its mode through its own ``train()``, as a training loop would.

    A layer that acts on a mode change (loralib merges its LoRA into W on ``eval()`` and
    unmerges it on ``train()``) then does so. ``modes`` lists the modules parents first, so a
    parent's ``train()`` sets its subtree, and a child in another mode is set after it.
    """
    for module, training in modes:
        if module.training != training:
            module.train(training)


def _summary(increases: list[float], clean: float, sigma: float, seed: int) -> Sharpness:
    std = statistics.stdev(increases) if len(increases) > 1 else 0.0
    return Sharpness(
        mean=statistics.fmean(increases),
        std=std,
        stderr=std / math.sqrt(len(increases)),
        clean_loss=clean,
        increases=tuple(increases),
        sigma=sigma,
        seed=seed,
    )


def _check_sigmas(sigma: Any) -> list[float]:
    if isinstance(sigma, (str, bytes)) or not isinstance(sigma, Sequence):
        return [check_sigma(sigma)]
    if not sigma:
        raise ValueError("Invalid sigma: an empty sequence. Pass a σ, or several: (0.05, 0.1).")
    return [check_sigma(s) for s in sigma]


@overload
def sharpness(
    model: Union[nn.Module, Iterable[nn.Module]],
    loss_fn: Callable[[Any], Tensor],
    batches: Iterable[Any],
    *,
    sigma: float = ...,
    samples: int = ...,
    seed: int = ...,
    adapters: Iterable[Adapter] = ...,
    eval_mode: bool = ...,
) -> Sharpness: ...


@overload
def sharpness(
    model: Union[nn.Module, Iterable[nn.Module]],
    loss_fn: Callable[[Any], Tensor],
    batches: Iterable[Any],
    *,
    sigma: Sequence[float],
    samples: int = ...,
    seed: int = ...,
    adapters: Iterable[Adapter] = ...,
    eval_mode: bool = ...,
) -> list[Sharpness]: ...


@torch.no_grad()
def sharpness(
    model: Union[nn.Module, Iterable[nn.Module]],
    loss_fn: Callable[[Any], Tensor],
    batches: Iterable[Any],
    *,
    sigma: Union[float, Sequence[float]] = 0.05,
    samples: int = 8,
    seed: int = 0,
    adapters: Iterable[Adapter] = (),
    eval_mode: bool = True,
) -> Union[Sharpness, list[Sharpness]]:
    """Measure the expected loss increase E_ε[L(W' + ε)] − L(W') under the Flat-LoRA law.

    Each of ``samples`` draws perturbs every target with ε_ij = σ·‖W'_i‖/√n·z_ij (σ fixed, no
    schedule) and evaluates the mean of ``loss_fn`` over ``batches``. A flat solution has a
    small increase; it is the quantity Flat-LoRA's objective penalises. flatopt writes none of
    the model's weights, the global RNG is not used, and no hook is left on the model.

    It measures the clean model whatever FlatPerturb is built on it: a ``FlatPerturb(auto=True)``
    does not arm itself at the forwards run here, and is left as found (``is_perturbed``,
    ``num_steps`` and its noise unchanged). Call it between steps, not while a perturbation is
    armed (after ``opt.step()`` with ``auto=True``, after ``opt.restore()`` otherwise).

    Several σ in one call (``sigma=(0.05, 0.1, 0.2)``) share the clean loss and the draws of
    z, so the curve against σ is smooth and costs ``1 + len(sigma) · samples`` evaluations.
    The same ``seed`` gives the same z to every model with the same targets: two models
    measured with one seed can be compared draw by draw (a paired difference).

    Args:
        model: the model (or iterable of modules) to scan for targets, as in FlatPerturb.
        loss_fn: called as ``loss_fn(batch)`` and returns a scalar loss (a one-element tensor
            or a number); it runs the model, calling its modules as ``module(x)`` so that
            flatopt's forward hooks run.
        batches: the batches to average over (held-out data shows generalisation).
        sigma: the relative noise scale, or a sequence of them.
        samples: the number of noise draws per σ.
        seed: the root seed of the draws.
        adapters: extra adapters, as in FlatPerturb.
        eval_mode: measure with the model in eval mode (no dropout). Modes are set and put
            back through each module's own ``eval()``/``train()``, as an evaluation loop
            would: a layer that merges its LoRA into W on ``eval()`` (loralib with
            ``merge_weights=True``) is measured merged and unmerged again on ``train()``.

    Returns:
        A `Sharpness` (the mean increase, its spread, `Sharpness.ci`, the clean loss) for a
        single σ; a list of them, in the order given, for a sequence of σ.

    Raises:
        ValueError: a negative ``sigma``, an empty sequence of them, bad ``samples``, no
            batches, no target in the model, or a ``loss_fn`` that returns a tensor of more
            than one element (reduce it, e.g. ``.mean()``).
        TypeError: a non-numeric ``sigma``, or a ``loss_fn`` that returns no number.
        RuntimeError: a perturbation is armed on the model (inside an auto step before
            ``opt.step()``, or between ``perturb()`` and ``restore()``); or no target layer
            ran while the noise was applied, so the increase would be a meaningless 0 (a model
            compiled before flatopt's hooks were on it, or a ``loss_fn`` that calls
            ``module.forward(x)``).

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 1)), ["0"], rank=2)
        >>> x, y = torch.randn(32, 8), torch.randn(32, 1)
        >>> loss = lambda batch: torch.nn.functional.mse_loss(net(batch[0]), batch[1])
        >>> result = sharpness(net, loss, [(x, y)], sigma=0.1, samples=4)
        >>> low, high = result.ci()
        >>> low <= result.mean <= high
        True
        >>> curve = sharpness(net, loss, [(x, y)], sigma=(0.05, 0.1, 0.2), samples=4)
        >>> len(curve), curve[-1].sigma
        (3, 0.2)
    """
    sigmas = _check_sigmas(sigma)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"Invalid samples: {samples!r}. Pass a positive int, e.g. samples=8.")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one batch to evaluate the loss on.")
    # Materialised once: an iterator would be used up by the target search below.
    modules = [model] if isinstance(model, nn.Module) else list(model)
    modes = [(m, m.training) for root in modules for m in root.modules()]
    slots = _slots(modules)
    _check_unperturbed(slots)
    hooked = {id(m) for m, _ in modes if find_slot(m) is not None}
    # A FlatPerturb(auto=True) arms itself at a training forward, and an explicit one counts
    # training forwards left clean: neither may see the forwards measured here.
    suspended = [(slot, slot.auto, slot.watch) for slot in slots]
    for slot in slots:
        slot.auto = slot.watch = False
    results = []
    try:
        # Named as FlatPerturb names them (opt.targets): a single model is scanned as itself.
        sites = build_sites(
            find_targets(model if isinstance(model, nn.Module) else modules, adapters)
        )
        if eval_mode:
            _set_modes([(m, False) for m, _ in modes])
        clean = _mean_loss(loss_fn, batches)
        for value in sigmas:
            increases, calls = _perturbed_increases(
                sites, value, seed, samples, loss_fn, batches, clean
            )
            if calls == 0:
                raise RuntimeError(
                    f"sharpness: none of the {len(sites)} target layers ran while the noise was "
                    "applied, so every loss was the clean one. flatopt perturbs through forward "
                    "hooks: call modules as module(x), not module.forward(x), and do not measure "
                    "through a torch.compile'd model compiled before flatopt's hooks were on it "
                    "(build the FlatPerturb before compiling, or let loss_fn call the "
                    "uncompiled model)."
                )
            results.append(_summary(increases, clean, value, seed))
    finally:
        try:
            _set_modes(modes)
        finally:
            for slot, auto, watch in suspended:
                slot.auto, slot.watch = auto, watch
            for module, _ in modes:  # leave the model exactly as found: no new hooks
                if id(module) not in hooked and find_slot(module) is not None:
                    drop_hooks(module)
    if isinstance(sigma, (str, bytes)) or not isinstance(sigma, Sequence):
        return results[0]
    return results
