"""``FlatPerturb``: Flat-LoRA's random weight perturbation as a wrapper around any optimizer.

The wrapper only holds state (seed, step count, targets); the noise law lives in
`flatopt.noise` and the mechanics of the swap in `flatopt._arming`.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._arming import Armed, Generators, Site, build_sites
from .adapters import Adapter, find_targets
from .noise import SCHEDULES, Schedule, derive_seed, schedule_factor

__all__ = ["FlatPerturb"]

_RESAMPLE = ("step", "call")


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"Invalid sigma: {sigma!r}. sigma must be a number, e.g. sigma=0.05.")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(
            f"Invalid sigma: {sigma!r}. sigma must be a finite number >= 0; the paper uses "
            "0.05 to 0.10 (0.15 for CLIP)."
        )
    return float(sigma)


def _check_schedule(schedule: Any, total_steps: Any) -> None:
    if callable(schedule):
        return
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Invalid schedule: {schedule!r}. Use one of {', '.join(map(repr, SCHEDULES))} or a "
            "callable step -> factor."
        )
    if schedule != "constant" and total_steps is None:
        raise ValueError(
            f"schedule={schedule!r} needs total_steps, got None. Pass the number of optimizer "
            "steps (e.g. total_steps=epochs * len(loader)), or use schedule='constant'."
        )
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(
            f"Invalid total_steps: {total_steps!r}. It must be a positive int, the number of "
            "optimizer steps over which the schedule ramps up."
        )


class FlatPerturb(torch.optim.Optimizer):
    """Wrap ``optimizer`` so each step trains on the loss at a random perturbation W' + ε.

    For every LoRA layer found in ``model`` the forward sees W + ε with
    ε_ij = σ_t·‖W'_i,:‖/√n·z_ij, where W' is the merged weight. W is never written:
    after `restore` every parameter and buffer is bitwise what it was.

    The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's, so LR schedulers and GradScaler work on it.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the trainable parameters.
        model: the ``nn.Module`` to scan for LoRA layers, or an iterable of modules.
        sigma: σ, the relative noise scale at the end of the ramp.
        schedule: ``"cosine"`` (the paper's), ``"linear"``, ``"constant"`` or a callable
            ``step -> factor``.
        total_steps: T, the length of the ramp; required by ``"cosine"`` and ``"linear"``.
        seed: the root of every noise seed; None draws one from torch's default generator now.
        adapters: extra adapters ``module -> Target | None``, tried before the built-in ones.
        resample: ``"step"`` keeps one ε per optimizer step (every micro-batch between two
            ``step()`` calls sees it); ``"call"`` draws fresh noise at every `perturb`.
        rank_noise: under ``torch.distributed``, each rank draws its own noise.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer, or an argument has the wrong type.
        ValueError: a bad ``sigma``, ``schedule``, ``total_steps`` or ``resample``, or no LoRA
            layer was found (the message lists the module types seen).

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], rank=2)
        >>> inner = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        >>> opt = FlatPerturb(inner, net, sigma=0.05, total_steps=100, seed=0)
        >>> with opt.perturbed():
        ...     net(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: Union[nn.Module, Iterable[nn.Module]],
        *,
        sigma: float = 0.05,
        schedule: Schedule = "cosine",
        total_steps: Optional[int] = None,
        seed: Optional[int] = None,
        adapters: Iterable[Adapter] = (),
        resample: str = "step",
        rank_noise: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                "Build one over the trainable parameters, e.g. torch.optim.AdamW(params)."
            )
        if isinstance(optimizer, FlatPerturb):
            raise TypeError("optimizer is already a FlatPerturb; wrap the inner optimizer once.")
        if not isinstance(model, nn.Module) and not isinstance(model, Iterable):
            raise TypeError(
                f"model must be an nn.Module or an iterable of nn.Module, got "
                f"{type(model).__name__}."
            )
        self._sigma = check_sigma(sigma)
        _check_schedule(schedule, total_steps)
        if resample not in _RESAMPLE:
            raise ValueError(
                f"Invalid resample: {resample!r}. Use 'step' (one noise draw per optimizer "
                "step, the paper's) or 'call' (a fresh draw at every perturb())."
            )
        if not isinstance(rank_noise, bool):
            raise TypeError(f"Invalid rank_noise: {rank_noise!r}. Pass True or False.")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(
                f"Invalid seed: {seed!r}. Pass an int, or None to draw one from torch's "
                "default generator."
            )
        adapters = tuple(adapters)
        for adapter in adapters:
            if not callable(adapter):
                raise TypeError(
                    f"Invalid adapter: {adapter!r}. adapters must be callables "
                    "module -> flatopt.Target | None."
                )

        self.optimizer = optimizer
        self._schedule = schedule
        self._total_steps = total_steps
        self._seed = seed
        self._resample = resample
        self._rank_noise = rank_noise
        self._step = 0  # completed optimizer steps: the schedule's t
        self._draw = 0  # perturb() calls in this step, for resample="call"
        self._sites = build_sites(find_targets(model, adapters))
        self._generators = Generators()
        self._armed: Optional[Armed] = None
        self._stds: Optional[tuple[int, list[Tensor]]] = None  # (step, per-site std)

        # The Optimizer plumbing, without registering the parameters a second time.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()

    # -- the wrapped optimizer's state, shared rather than copied ---------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # -- read-only views --------------------------------------------------------------------

    @property
    def sigma(self) -> float:
        """σ_t, the noise scale of the current step: σ · schedule(num_steps)."""
        return self._sigma * schedule_factor(self._schedule, self._step, self._total_steps)

    @property
    def num_steps(self) -> int:
        """The number of completed ``step()`` calls: the schedule's t."""
        return self._step

    @property
    def is_perturbed(self) -> bool:
        """True between `perturb` and `restore`."""
        return self._armed is not None

    @property
    def seed(self) -> int:
        """The root seed every noise draw derives from."""
        return self._seed

    @property
    def targets(self) -> list[tuple[str, tuple[int, int]]]:
        """``(qualified module name, (out_features, fan_in))`` of every perturbed weight."""
        return [(site.name, site.logical_shape) for site in self._sites]

    # -- perturb / restore ------------------------------------------------------------------

    def perturb(self) -> None:
        """Arm the noise: until `restore`, each target's forward sees W + ε.

        Nothing is written: the forward reads a transient W + ε, and backward regenerates it
        from the seed. Call ``backward()`` before `restore`.

        Raises:
            RuntimeError: the perturbation is already armed.

        Example:
            >>> from flatopt.lora import add_lora
            >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=2)
            >>> opt = FlatPerturb(torch.optim.SGD(net[0].parameters(), lr=0.1), net,
            ...                   schedule="constant", seed=0)
            >>> opt.perturb()
            >>> net(torch.ones(1, 4)).sum().backward()
            >>> opt.restore()
            >>> opt.step()
        """
        if self._armed is not None:
            raise RuntimeError(
                "perturb() was called twice without restore(). Call opt.restore() after "
                "backward(), or use `with opt.perturbed():`."
            )
        sigma = self.sigma
        sites: list[Site] = []
        stds: list[Tensor] = []
        if sigma > 0:
            if self._stds is None or self._stds[0] != self._step:
                self._stds = (self._step, [site.std(sigma) for site in self._sites])
            sites, stds = self._sites, self._stds[1]
        draw = self._draw if self._resample == "call" else 0
        rank = _rank() if self._rank_noise else 0
        seeds = [derive_seed(self._seed, self._step, draw, site.index, rank) for site in sites]
        self._armed = Armed(sites, stds, seeds, self._generators)
        self._draw += 1

    def restore(self) -> None:
        """Disarm the noise. Every parameter and buffer is bitwise as before `perturb`.

        Raises:
            RuntimeError: nothing is armed.
        """
        self._restore(warn=True)

    def _restore(self, warn: bool) -> None:
        if self._armed is None:
            raise RuntimeError(
                "restore() was called with nothing armed. Call opt.perturb() first, or use "
                "`with opt.perturbed():`."
            )
        armed, self._armed = self._armed, None
        ran = armed.calls
        armed.disarm()
        if warn and armed.size and ran == 0:
            warnings.warn(
                "No target layer ran between perturb() and restore(), so nothing was "
                "perturbed. Run the forward in between, and call modules as module(x) (their "
                "hooks must run); build FlatPerturb before the first call of a torch.compile'd "
                "model.",
                stacklevel=2,
            )

    @contextmanager
    def perturbed(self) -> Iterator[FlatPerturb]:
        """Context manager form of `perturb` / `restore`; restores on exceptions.

        Example:
            >>> from flatopt.lora import add_lora
            >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=2)
            >>> opt = FlatPerturb(torch.optim.SGD(net[0].parameters(), lr=0.1), net,
            ...                   schedule="constant", seed=0)
            >>> with opt.perturbed():
            ...     net(torch.ones(1, 4)).sum().backward()
            >>> opt.is_perturbed
            False
        """
        self.perturb()
        try:
            yield self
        except BaseException:
            self._restore(warn=False)
            raise
        self._restore(warn=True)

    # -- the optimizer interface ------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Take the wrapped optimizer's step and advance the noise schedule.

        With a ``closure``, it runs perturbed: perturb -> closure() -> restore, then the inner
        step. The closure is handed to the inner optimizer, so LBFGS-style optimizers that
        call it several times see the same ε each time.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: the perturbation is still armed (call `restore` first).
        """
        if self._armed is not None:
            raise RuntimeError(
                "step() was called while the perturbation is armed. Call opt.restore() after "
                "backward() and before opt.step(), or use `with opt.perturbed():`."
            )
        if closure is None:
            loss = self.optimizer.step()
        else:

            def perturbed_closure() -> Any:
                with torch.enable_grad(), self.perturbed():
                    return closure()

            loss = self.optimizer.step(perturbed_closure)
        self._step += 1
        self._draw = 0
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Forward to the wrapped optimizer's ``add_param_group``."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"flatopt"`` entry.

        That entry holds the seed, step count and noise settings, so loading it into a fresh
        wrapper continues the run bit for bit.
        """
        state = self.optimizer.state_dict()
        state["flatopt"] = {
            "seed": self._seed,
            "num_steps": self._step,
            "draw": self._draw,
            "sigma": self._sigma,
            "schedule": "callable" if callable(self._schedule) else self._schedule,
            "total_steps": self._total_steps,
            "resample": self._resample,
            "rank_noise": self._rank_noise,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict`; the checkpoint's noise settings replace the current ones.

        A state dict written by the bare wrapped optimizer (no ``"flatopt"`` entry) loads the
        optimizer state only, keeps flatopt's seed and step count, and warns.

        Raises:
            RuntimeError: the perturbation is armed.
            ValueError: the checkpoint used a callable schedule and this wrapper has none.
        """
        if self._armed is not None:
            raise RuntimeError("load_state_dict() while perturbed; call opt.restore() first.")
        state_dict = dict(state_dict)
        own = state_dict.pop("flatopt", None)
        if own is not None and own["schedule"] == "callable" and not callable(self._schedule):
            raise ValueError(
                "The checkpoint was written with a callable schedule; build this FlatPerturb "
                "with the same callable (schedule=...) before loading it."
            )
        self.optimizer.load_state_dict(state_dict)
        if own is None:
            warnings.warn(
                "state_dict has no 'flatopt' entry (written by the bare optimizer?): loaded the "
                f"optimizer state; the noise keeps seed={self._seed} and num_steps={self._step}.",
                stacklevel=2,
            )
            return
        self._seed = int(own["seed"])
        self._step = int(own["num_steps"])
        self._draw = int(own["draw"])
        self._sigma = float(own["sigma"])
        if own["schedule"] != "callable":
            self._schedule = own["schedule"]
        self._total_steps = own["total_steps"]
        self._resample = own["resample"]
        self._rank_noise = bool(own["rank_noise"])
        self._stds = None

    def __repr__(self) -> str:
        schedule = getattr(self._schedule, "__name__", None) or repr(self._schedule)
        if isinstance(self._schedule, str):
            schedule = repr(self._schedule)
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"FlatPerturb (\n"
            f"  sigma: {self._sigma:g} (now {self.sigma:.4g})\n"
            f"  schedule: {schedule}, total_steps: {self._total_steps}\n"
            f"  resample: {self._resample!r}, rank_noise: {self._rank_noise}, seed: {self._seed}\n"
            f"  num_steps: {self._step}, perturbed: {self.is_perturbed}\n"
            f"  targets: {len(self._sites)} layers, {self._num_weights():,} weights\n"
            f"  optimizer:\n{inner}\n)"
        )

    def _num_weights(self) -> int:
        return sum(rows * fan_in for rows, fan_in in (s.logical_shape for s in self._sites))
