"""``FlatPerturb``: Flat-LoRA's random weight perturbation as a wrapper around any optimizer.

The wrapper only holds state (seed, step count, targets); the noise law lives in
`flatopt._flat` (its maths in `flatopt.noise`) and the mechanics of the swap in
`flatopt._arming` and the modules it names.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import _flat, _stuck, _zero
from ._arming import Arming, Generators, Site, _Slot, build_sites, root_hook
from ._flat import FlatLoRA, sigma_t
from ._hooks import guard_while_armed
from ._swap import Law
from ._wrapper import Wrapper
from .adapters import Adapter, check_adapters, find_targets
from .noise import SCHEDULES, Schedule

__all__ = ["FlatPerturb", "unwrap"]

_RESAMPLE = ("step", "call")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(value: Any, name: str, *, what: str, minimum: str, hint: str) -> float:
    """``value`` as a Python float: a real number (NumPy's too), finite, not a bool, and
    ``minimum`` (``">= 0"`` or ``"> 0"``); the errors name ``name``, the value and ``hint``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: {value!r}. {what} must be a number, e.g. {what}=0.05.")
    number = float(value)
    low = number < 0 if minimum == ">= 0" else number <= 0
    if not math.isfinite(number) or low:
        raise ValueError(
            f"Invalid {name}: {value!r}. {what} must be a finite number {minimum}{hint}"
        )
    return number


def check_sigma(sigma: Any, name: str = "sigma") -> float:
    """``sigma`` as a Python float: any real number (NumPy's too) >= 0 and finite, not a bool."""
    hint = "; the paper uses 0.05 to 0.10 (0.15 for CLIP)."
    return check_number(sigma, name, what="sigma", minimum=">= 0", hint=hint)


def _check_total_steps(total_steps: Any, where: str = "") -> Optional[int]:
    if total_steps is None:
        return None
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(
            f"Invalid {where}total_steps: {total_steps!r}. It must be None or a positive int, the "
            "number of optimizer steps over which the schedule ramps up."
        )
    return int(total_steps)


def _check_schedule(schedule: Any, total_steps: Any, where: str = "") -> Optional[int]:
    """Check a schedule and its total_steps (always, a callable schedule's too); return the
    total_steps as a Python int or None."""
    total_steps = _check_total_steps(total_steps, where)
    if callable(schedule):
        return total_steps
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(
            f"Invalid {where}schedule: {schedule!r}. Use one of "
            f"{', '.join(map(repr, SCHEDULES))} or a callable step -> factor."
        )
    if schedule != "constant" and total_steps is None:
        raise ValueError(
            f"schedule={schedule!r} needs total_steps, got None. Pass the number of optimizer "
            "steps the ramp lasts (optimizer steps, not batches: with gradient accumulation, "
            "epochs * (len(loader) // accumulation_steps)), or use schedule='constant'."
        )
    return total_steps


_SEED_BOUND = 2**64  # seeds are mixed as 64-bit words: each seed in [0, 2**64) is its own run


def _check_seed(seed: Any, name: str = "seed") -> int:
    if not _is_int(seed):
        raise TypeError(
            f"Invalid {name}: {seed!r}. Pass an int in [0, 2**64), or None to draw one from "
            "torch's default generator."
        )
    if not 0 <= seed < _SEED_BOUND:
        raise ValueError(
            f"Invalid {name}: {seed!r}. A seed is an int in [0, 2**64) (the noise mixes it as a "
            "64-bit word, so a larger or negative one would repeat another seed's noise); pass "
            "e.g. seed % 2**64, or seed=None."
        )
    return int(seed)


def _check_count(value: Any, key: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(
            f"Invalid state_dict['flatopt'][{key!r}]: {value!r}; expected an int >= 0. Load a "
            "state dict written by FlatPerturb.state_dict()."
        )
    return int(value)


def _factor_modules(
    name: str, target: Any, roots: list[nn.Module], indexed: bool
) -> list[nn.Module]:
    """The modules whose trainable parameters are a target's factors: the module the adapter
    recognised (named ``name`` in the scanned model) and ``Target.module``."""
    modules = [target.module]
    if indexed:
        head, _, name = name.partition(".")
        root = roots[int(head)]
    else:
        root = roots[0]
    with contextlib.suppress(AttributeError):
        recognised = root.get_submodule(name) if name else root
        if recognised is not target.module:
            modules.append(recognised)
    return modules


def _callable_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


class _State:
    """Everything a FlatPerturb changes after it is built, behind one reference.

    Framework wrappers that copy an optimizer's ``__dict__`` (Lightning's LightningOptimizer)
    then share this object with the FlatPerturb instead of forking its counters.
    """

    def __init__(self, model: Any, adapters: tuple, settings: dict[str, Any]):
        self.model = model
        self.adapters = adapters
        self.seed: int = settings["seed"]
        self.sigma: float = settings["sigma"]
        self.schedule: Schedule = settings["schedule"]
        self.total_steps: Optional[int] = settings["total_steps"]
        self.resample: str = settings["resample"]
        self.rank_noise: bool = settings["rank_noise"]
        self.auto: bool = settings["auto"]
        self.step = 0  # completed optimizer steps: the schedule's t
        self.draw = 0  # draws in this step, for resample="call"
        self.arming: Optional[Arming] = None
        self.stds: dict[int, Tensor] = {}  # per-site std of the current step, set lazily
        self.generators = Generators()
        self.perturbed_step = False  # perturb() ran since the last step()
        self.calls_step = 0  # target forwards that ran perturbed since the last step()
        self.warned: set[str] = set()
        self.seed_given: bool = settings.get("seed_given", True)  # False: drawn, not chosen
        self.model_forwards = 0  # training forwards of the model since the last step()
        self.in_closure = False  # step(closure) is running the closure, perturbed
        self.in_step = False  # step() is running the wrapped optimizer's step
        self.sites: list[Site] = []
        self.taken_by: Optional[str] = None  # the wrapper that took the model over, described
        self.scan(warn=False)

    # -- targets ---------------------------------------------------------------------------

    def roots(self) -> tuple[list[nn.Module], bool]:
        if isinstance(self.model, nn.Module):
            return [self.model], False
        return list(self.model), True

    def scan(self, warn: bool) -> None:
        roots, indexed = self.roots()
        before = {id(r.target.module): r.name for site in self.sites for r in site.readers}
        old_slots = [(r.slot, r.target.module) for site in self.sites for r in site.readers]
        sites = build_sites(find_targets(self.model, self.adapters), roots, indexed)
        self.take_over({id(r.slot): r.slot for site in sites for r in site.readers}.values())
        self.sites = sites
        current = {id(r.slot) for site in self.sites for r in site.readers}
        for slot, module in old_slots:  # a module no longer in the model arms nothing
            if id(slot) not in current and slot.owner is not None and slot.owner() is self:
                slot.auto, slot.watch, slot.owner = False, False, None
                guard_while_armed(slot, module)
        self.stds = {}
        me = weakref.ref(self)
        for site in self.sites:
            for reader in site.readers:
                slot = reader.slot
                slot.owner, slot.auto, slot.watch = me, self.auto, not self.auto
                guard_while_armed(slot, reader.target.module)
        if self.auto and self.resample == "call":
            root_hook(self.model, self)
        after = {id(r.target.module): r.name for site in self.sites for r in site.readers}
        gone = sorted(name for key, name in before.items() if key not in after)
        if warn and gone:  # a module moved within the model is found again, silently
            warnings.warn(
                f"Target modules {gone} were replaced or deleted after FlatPerturb was built; "
                f"flatopt re-scanned the model and now perturbs {len(self.sites)} weights: "
                f"{[site.name for site in self.sites]}.",
                stacklevel=4,
            )

    def describe(self) -> str:
        return f"FlatPerturb(seed={self.seed}, num_steps={self.step}, auto={self.auto})"

    def take_over(self, slots: Iterable[_Slot]) -> None:
        """Make this wrapper the one owner of ``slots``' modules: a model belongs to one live
        FlatPerturb at a time. Another live owner is released, with a warning if it has been
        used (it raises at its next perturb() or step()); one perturbing the model now is
        refused."""
        others: dict[int, _State] = {}
        for slot in slots:
            owner = slot.owner() if slot.owner is not None else None
            if owner is not None and owner is not self and owner.taken_by is None:
                if slot.frames:
                    raise RuntimeError(
                        f"A FlatPerturb was built on a model while {owner.describe()} is "
                        "running a perturbed forward of it. Build it outside the model's "
                        "forward."
                    )
                others[id(owner)] = owner
        for other in others.values():
            if other.arming is not None and not other.arming.auto:
                raise RuntimeError(
                    f"This model is perturbed by {other.describe()} right now (between its "
                    "perturb() and restore()); a model belongs to one FlatPerturb at a time. "
                    "Call restore() on that one (or leave its `with opt.perturbed():`) before "
                    "building another, or release the model with flatopt.remove_hooks(model)."
                )
        for other in others.values():
            used = other.step > 0 or other.draw > 0 or other.arming is not None
            other.disarm()  # an auto wrapper between two forwards: nothing is in flight
            other.taken_by = self.describe()
            if not used:  # built and never used (a re-assigned variable): handed over quietly
                continue
            warnings.warn(
                f"{other.describe()} was already built on this model; the new "
                f"{self.describe()} takes it over, and the earlier one raises at its next "
                "perturb() or step(). A model belongs to one FlatPerturb at a time: drop the "
                "old wrapper (a trainer may still hold it), or call flatopt.remove_hooks(model) "
                "to release the model explicitly.",
                stacklevel=5,
            )

    def check_owner(self) -> None:
        if self.taken_by is not None:
            raise RuntimeError(
                f"This {self.describe()} no longer perturbs its model: {self.taken_by}, built "
                "on the same model later, took it over (a model belongs to one FlatPerturb at "
                "a time). Use the newer wrapper, or build a new one; flatopt.remove_hooks(model) "
                "releases a model explicitly."
            )

    def check_model(self) -> None:
        """Re-scan when a target module is no longer where it was found."""
        for site in self.sites:
            for reader in site.readers:
                if not reader.in_place():
                    self.scan(warn=True)
                    return

    # -- arming ----------------------------------------------------------------------------

    def sigma_t(self) -> float:
        return sigma_t(self.sigma, self.schedule, self.step, self.total_steps)

    def active(self) -> bool:
        """Whether this step perturbs at all (σ_t > 0)."""
        return self.sigma_t() > 0

    def law(self) -> Law:
        draw = self.draw if self.resample == "call" else 0
        rank = _flat.rank() if self.rank_noise else 0
        sigma = self.sigma_t()
        return FlatLoRA(sigma, self.seed, self.step, draw, rank, self.stds, self.generators)

    def arm(self, auto: bool) -> None:
        self.check_model()
        sites = self.sites if self.active() else []
        self.arming = Arming(sites, self.law(), auto=auto)
        self.draw += 1

    def disarm(self) -> Optional[Arming]:
        arming, self.arming = self.arming, None
        if arming is not None:
            arming.disarm()
            self.calls_step += arming.calls
        return arming

    def auto_arm(self) -> None:
        """Called by a target's forward in training mode (``auto=True``)."""
        if self.arming is None and self.taken_by is None:
            self.arm(auto=True)

    def next_draw(self) -> None:
        """Called by the model's forward in training mode (``auto=True, resample="call"``)."""
        self.model_forwards += 1
        if self.arming is not None:
            self.disarm()

    def clean_forwards(self) -> int:
        """Training-mode target forwards that ran unperturbed since the last call."""
        count = 0
        for site in self.sites:
            for reader in site.readers:
                count += reader.slot.clean
                reader.slot.clean = 0
        return count

    def __del__(self) -> None:
        # A FlatPerturb dropped while armed (a trainer stopped mid-step) leaves nothing armed.
        arming = getattr(self, "arming", None)
        if arming is not None:
            with contextlib.suppress(Exception):
                arming.disarm()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=4)


class FlatPerturb(Wrapper):
    """Wrap ``optimizer`` so each step trains on the loss at a random perturbation W' + ε.

    For every LoRA layer found in ``model`` the forward sees W + ε with
    ε_ij = σ_t·‖W'_i,:‖/√n·z_ij, where W' is the merged weight. W is never written:
    after `restore` every parameter and buffer is bitwise what it was.

    The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's, so LR schedulers and GradScaler work on it.

    Two ways to drive it:

    - explicit (default): `perturb` before the forward, `restore` after the backward (or
      ``with opt.perturbed():``, or ``opt.step(closure)``). A ``step()`` with no `perturb`
      since the previous one warns once.
    - ``auto=True``, for trainers that own the loop (HF Trainer, Lightning, Accelerate, …):
      nobody calls `perturb`/`restore`. Every forward of a target in training mode between two
      ``step()`` calls sees W + ε of that step, bit for bit as if `perturb` had run before the
      step's first forward and `restore` at ``step()``. Forwards in eval mode see W; forwards
      under ``torch.no_grad()`` in training mode see W + ε (they are training forwards).

    σ and σ_t: ``sigma=`` is σ, the scale the schedule ramps to. It is what `base_sigma`
    returns and what ``state_dict()["flatopt"]["sigma"]`` saves. ``opt.sigma`` is σ_t =
    σ·schedule(num_steps), the scale the current step draws with: 0 at the first step of a
    ``"cosine"`` or ``"linear"`` ramp, σ from step T on.

    The optimizer should hold the LoRA factors of every target (the trainable parameters of the
    layers the adapters recognised); construction warns, naming the targets, when no param
    group holds a target's factors, as when the optimizer is another model's.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the trainable parameters.
        model: the ``nn.Module`` to scan for LoRA layers, or an iterable of modules.
        sigma: σ, the relative noise scale at the end of the ramp: a real number >= 0.
        schedule: ``"cosine"`` (the paper's), ``"linear"``, ``"constant"`` or a callable
            ``step -> factor``.
        total_steps: T, the length of the ramp in optimizer steps: None or a positive int;
            required by ``"cosine"`` and ``"linear"``.
        seed: the root of every noise seed, an int in [0, 2**64) (each one a different run);
            None draws one from torch's default generator now.
        adapters: extra adapters ``module -> Target | None`` (one callable, or a list of
            them), tried before the built-in ones.
        resample: ``"step"`` keeps one ε per optimizer step (every micro-batch between two
            ``step()`` calls sees it); ``"call"`` draws fresh noise at every `perturb`, and
            with ``auto=True`` at every training-mode forward of ``model``, which must then be
            called as ``model(x)`` (its forward pre-hook starts the draw; ``step()`` warns
            when target layers ran but the model's own forward hook never did).
        rank_noise: under ``torch.distributed``, each rank draws its own noise.
        auto: arm the noise from the model's own training-mode forwards (drop-in mode).

    NumPy scalars are accepted where a Python number is (``np.float32`` σ, ``np.int64``
    seed), and stored as Python ``float``/``int``; ``bool`` is refused.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer, or an argument has the wrong type (a
            string for ``adapters``, say).
        ValueError: a bad ``sigma``, ``schedule``, ``total_steps``, ``seed`` or ``resample``,
            or no LoRA layer was found (the message lists the module types seen).

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], rank=2)
        >>> inner = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        >>> opt = FlatPerturb(inner, net, sigma=0.05, total_steps=100, seed=0)
        >>> with opt.perturbed():
        ...     net(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()

        In a trainer that owns the loop, ``auto=True`` needs no calls at all:

        >>> opt = FlatPerturb(inner, net, sigma=0.05, total_steps=100, auto=True)
        >>> net(torch.randn(4, 8)).square().mean().backward()  # sees W + ε
        >>> opt.step(); opt.zero_grad()
    """

    _state_type = _State  # what the wrapper arms: `flatopt.BiLoRA` arms another law

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
        auto: bool = False,
    ):
        optimizer = _zero.unwrap_optimizer(optimizer)  # engine.optimizer: the one it wraps
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                "Build one over the trainable parameters, e.g. torch.optim.AdamW(params)."
            )
        if isinstance(optimizer, FlatPerturb):
            raise TypeError("optimizer is already a FlatPerturb; wrap the inner optimizer once.")
        if not isinstance(model, nn.Module):
            if not isinstance(model, Iterable):
                raise TypeError(
                    f"model must be an nn.Module or an iterable of nn.Module, got "
                    f"{type(model).__name__}."
                )
            model = list(model)  # an iterator would be used up by the first scan
        sigma = check_sigma(sigma)
        total_steps = _check_schedule(schedule, total_steps)
        if resample not in _RESAMPLE:
            raise ValueError(
                f"Invalid resample: {resample!r}. Use 'step' (one noise draw per optimizer "
                "step, the paper's) or 'call' (a fresh draw at every perturb())."
            )
        if not isinstance(rank_noise, bool):
            raise TypeError(f"Invalid rank_noise: {rank_noise!r}. Pass True or False.")
        if not isinstance(auto, bool):
            raise TypeError(f"Invalid auto: {auto!r}. Pass True or False.")
        if auto and resample == "call" and not isinstance(model, nn.Module):
            raise ValueError(
                "resample='call' with auto=True needs model to be one nn.Module: each of its "
                "training forwards starts a new draw. Pass the model itself, or use "
                "resample='step'."
            )
        seed_given = seed is not None
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        seed = _check_seed(seed)
        adapters = check_adapters(adapters)

        self._inner = optimizer
        settings = {
            "seed": seed,
            "seed_given": seed_given,
            "sigma": sigma,
            "schedule": schedule,
            "total_steps": total_steps,
            "resample": resample,
            "rank_noise": rank_noise,
            "auto": auto,
        }
        self._state = self._state_type(model, adapters, settings)

        self._wrap(optimizer)
        _zero.watch(self)  # count the steps DeepSpeed's engine takes of the wrapped optimizer
        _stuck.watch(self)  # warn when something else trains the model
        self._warn_unheld_factors()

    def _warn_unheld_factors(self) -> None:
        """Warn when no param group holds a target's LoRA factors: it would be perturbed, but
        nothing would train it (another model's optimizer, or factors left out)."""
        state = self._state
        held = {id(p) for group in self._inner.param_groups for p in group["params"]}
        roots, indexed = state.roots()
        unheld = []
        for site in state.sites:
            for reader in site.readers:
                factors = {
                    id(p)
                    for module in _factor_modules(reader.name, reader.target, roots, indexed)
                    for p in module.parameters()
                    if p.requires_grad
                }
                if factors and not factors & held:
                    unheld.append(reader.name)
        if not unheld or _zero.managed(roots):  # DeepSpeed's optimizer holds flat partitions
            return
        model_params = {id(p) for root in roots for p in root.parameters()}
        hint = (
            " It holds none of this model's parameters: was it built over another model (or "
            "before a copy, or before sharding)?"
            if not model_params & held
            else ""
        )
        warnings.warn(
            f"The optimizer holds none of the trainable parameters (the LoRA factors) of the "
            f"targets {unheld}, so flatopt perturbs them but nothing trains them.{hint} Build "
            "the optimizer over this model's trainable parameters, e.g. torch.optim.AdamW("
            "[p for p in model.parameters() if p.requires_grad]), or add them with "
            "opt.add_param_group({'params': [...]}).",
            stacklevel=3,
        )

    # -- read-only views --------------------------------------------------------------------

    @property
    def sigma(self) -> float:
        """σ_t, the noise scale of the current step: `base_sigma` · schedule(num_steps)."""
        return self._state.sigma_t()

    @property
    def base_sigma(self) -> float:
        """σ, the configured scale that the schedule ramps to: the constructor's ``sigma``, or
        a loaded checkpoint's (``state_dict()["flatopt"]["sigma"]``)."""
        return self._state.sigma

    @property
    def num_steps(self) -> int:
        """The number of completed ``step()`` calls: the schedule's t."""
        return self._state.step

    @property
    def is_perturbed(self) -> bool:
        """True between `perturb` and `restore` (with ``auto=True``: from the step's first
        training forward to ``step()``)."""
        return self._state.arming is not None

    @property
    def seed(self) -> int:
        """The root seed every noise draw derives from."""
        return self._state.seed

    @property
    def auto(self) -> bool:
        """True in drop-in mode: the noise arms itself from the model's training forwards."""
        return self._state.auto

    @property
    def targets(self) -> list[tuple[str, tuple[int, int]]]:
        """``(qualified module name, (out_features, fan_in))`` of every perturbed weight."""
        return [(site.name, site.logical_shape) for site in self._state.sites]

    @property
    def _sites(self) -> list[Site]:
        return self._state.sites

    # -- perturb / restore ------------------------------------------------------------------

    def perturb(self) -> None:
        """Arm the noise: until `restore`, each target's forward sees W + ε.

        Nothing is written: the forward reads a transient W + ε, and backward regenerates it
        from the seed. Call ``backward()`` before `restore`.

        Raises:
            RuntimeError: the perturbation is already armed, or the wrapper was built with
                ``auto=True`` (it arms itself).

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
        state = self._state
        state.check_owner()
        if state.auto:
            raise RuntimeError(
                "perturb() on a FlatPerturb built with auto=True, which arms itself at each "
                "step's first training forward. Drop the perturb()/restore() calls, or build "
                "it with auto=False."
            )
        if state.in_closure:
            raise RuntimeError(
                "perturb() (or `with opt.perturbed():`) inside the closure of step(closure): "
                "step(closure) already perturbs the closure and restores after it. Drop the "
                "perturb()/restore() calls from the closure."
            )
        if state.arming is not None:
            raise RuntimeError(
                "perturb() was called twice without restore(). Call opt.restore() after "
                "backward(), or use `with opt.perturbed():`."
            )
        state.arm(auto=False)
        state.perturbed_step = True

    def restore(self) -> None:
        """Disarm the noise. Every parameter and buffer is bitwise as before `perturb`.

        Raises:
            RuntimeError: nothing is armed, or this runs inside the closure of
                ``step(closure)``, which restores by itself.
        """
        if self._state.in_closure:
            raise RuntimeError(
                "restore() inside the closure of step(closure): step(closure) already perturbs "
                "the closure and restores after it. Drop the perturb()/restore() calls from the "
                "closure."
            )
        self._restore(warn=True)

    def _restore(self, warn: bool) -> None:
        state = self._state
        if state.auto:
            raise RuntimeError(
                "restore() on a FlatPerturb built with auto=True: it disarms itself at step(). "
                "Drop the perturb()/restore() calls, or build it with auto=False."
            )
        if state.arming is None:
            raise RuntimeError(
                "restore() was called with nothing armed. Call opt.perturb() first, or use "
                "`with opt.perturbed():`."
            )
        armed = state.disarm()
        if warn and armed is not None and armed.size and armed.calls == 0:
            warnings.warn(
                "No target layer ran between perturb() and restore(), so nothing was "
                "perturbed. Run the forward in between, and call modules as module(x) (their "
                "hooks must run); build FlatPerturb before the first call of a torch.compile'd "
                "model.",
                stacklevel=3,
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
            if self._state.arming is not None:  # step() inside the block restored and raised
                self._restore(warn=False)
            raise
        self._restore(warn=True)

    # -- the optimizer interface ------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Take the wrapped optimizer's step and advance the noise schedule.

        With a ``closure`` in explicit mode, the closure runs perturbed: perturb -> closure()
        -> restore around each evaluation, inside the inner step. With ``resample="step"``,
        optimizers that evaluate the closure several times (LBFGS) see the same ε each time;
        with ``resample="call"`` each evaluation draws fresh noise. If `perturb` already ran in
        this step (a framework that runs forward and backward itself and passes a no-op
        closure), the closure is passed through untouched. With ``auto=True`` the closure's
        training forwards see the step's ε, like every other forward of the step.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: the perturbation is still armed (explicit mode). flatopt restores it
                and the step is not taken.
        """
        if _zero.later_group(self):  # DeepSpeed steps its optimizer one group at a time
            return self._inner.step(closure)
        state = self._state
        state.check_owner()
        if state.arming is not None and not state.arming.auto:
            self._restore(warn=False)
            raise RuntimeError(
                "step() was called while the perturbation is armed; flatopt restored it and "
                "did not take the step. Call opt.restore() after backward() and before "
                "opt.step(), or use `with opt.perturbed():`."
            )
        active = state.active()
        clean = 0 if state.auto else state.clean_forwards()
        if not state.auto and not state.perturbed_step:
            if closure is not None:
                closure = self._perturbed_closure(closure)
                if clean and active:  # micro-batches ran before the closure, unperturbed
                    state.warn_once("partly", self._partly_message(clean))
            elif active:
                state.warn_once(
                    "explicit",
                    "step() ran without perturb() since the previous step, so this step "
                    "trained on the clean weights. Call opt.perturb()/opt.restore() around the "
                    "forward and backward, or build FlatPerturb(..., auto=True) when a trainer "
                    "(HF Trainer, Lightning, Accelerate, ...) owns the loop.",
                )
        elif not state.auto and clean and active:
            state.warn_once("partly", self._partly_message(clean))
        state.in_step = True  # the wrapped optimizer's step is this one's, not someone else's
        try:
            loss = self._inner.step() if closure is None else self._inner.step(closure)
        finally:
            state.in_step = False
            if state.auto:
                state.disarm()
        if state.auto and active and state.calls_step == 0:
            state.warn_once(
                "auto",
                "FlatPerturb(auto=True): no target layer ran a training-mode forward in this "
                "step, so nothing was perturbed. Run the forward in training mode "
                "(model.train()), call modules as module(x), and build FlatPerturb before the "
                "first call of a torch.compile'd model.",
            )
        if (
            state.auto
            and state.resample == "call"
            and active
            and state.calls_step > 0
            and state.model_forwards == 0
        ):
            state.warn_once(
                "call",
                "FlatPerturb(auto=True, resample='call'): target layers ran training forwards "
                "in this step but the model's own forward never ran its hooks, so every one of "
                "them saw the same ε instead of a fresh draw per forward of the model. Call the "
                "model as model(x), not model.forward(x) or a submodule alone, or use "
                "resample='step'.",
            )
        if not state.auto:  # forwards counted while this step ran (its closure, at σ_t = 0)
            state.clean_forwards()  # are not the next step's forwards outside perturb()
        state.step += 1
        state.stds = {}  # the row norms of W' are the next step's to compute
        state.draw = 0
        state.perturbed_step = False
        state.calls_step = 0
        state.model_forwards = 0
        return loss

    @staticmethod
    def _partly_message(clean: int) -> str:
        return (
            f"{clean} training-mode forwards of target layers ran outside perturb()/restore() "
            "in this step, so they trained on the clean weights (a trainer's gradient "
            "accumulation running micro-batches outside step(closure)?). Perturb every "
            "micro-batch, or build FlatPerturb(..., auto=True) when a trainer owns the loop."
        )

    def _perturbed_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        state = self._state

        def perturbed_closure() -> Any:
            try:
                with torch.enable_grad(), self.perturbed():
                    state.in_closure = True
                    try:
                        return closure()
                    finally:
                        state.in_closure = False
            finally:  # the closure's perturb() is not the caller's: a retried step perturbs again
                state.perturbed_step = False

        return perturbed_closure

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"flatopt"`` entry.

        That entry holds the seed, step count and noise settings, so loading it into a fresh
        wrapper continues the run bit for bit. A callable schedule is saved by its qualified
        name (``module.qualname``). Hooks registered with ``register_state_dict_pre_hook`` and
        ``register_state_dict_post_hook`` run as on any ``torch.optim.Optimizer``: the
        pre-hooks before anything is read, the post-hooks on the whole dict (``"flatopt"``
        included), each free to return a replacement.
        """
        state = self._state
        return self._state_dict_with(
            "flatopt",
            lambda: {
                "seed": state.seed,
                "num_steps": state.step,
                "draw": state.draw,
                "sigma": state.sigma,
                "schedule": "callable" if callable(state.schedule) else state.schedule,
                "schedule_name": _callable_name(state.schedule)
                if callable(state.schedule)
                else None,
                "total_steps": state.total_steps,
                "resample": state.resample,
                "rank_noise": state.rank_noise,
            },
        )

    def _check_own(self, own: Any) -> dict[str, Any]:
        """Validate a state dict's ``"flatopt"`` entry by the constructor's rules."""
        if not isinstance(own, dict):
            raise TypeError(
                f"state_dict['flatopt'] must be a dict, got {type(own).__name__}. Load a state "
                "dict written by FlatPerturb.state_dict()."
            )
        keys = ("seed", "num_steps", "draw", "sigma", "schedule", "total_steps", "resample")
        for key in (*keys, "rank_noise"):
            if key not in own:
                raise ValueError(
                    f"state_dict['flatopt'] has no {key!r} entry; was it written by "
                    "FlatPerturb.state_dict()? Nothing was loaded."
                )
        seed = _check_seed(own["seed"], name="state_dict['flatopt']['seed']")
        sigma = check_sigma(own["sigma"], name="state_dict['flatopt']['sigma']")
        where = "state_dict['flatopt'] "
        total_steps = _check_total_steps(own["total_steps"], where=where)
        schedule = own["schedule"]
        current = self._state.schedule
        if schedule == "callable":
            if not callable(current):
                raise ValueError(
                    "The checkpoint was written with a callable schedule; build this "
                    "FlatPerturb with the same callable (schedule=...) before loading it."
                )
            saved_name = own.get("schedule_name")
            if saved_name is not None and saved_name != _callable_name(current):
                raise ValueError(
                    f"The checkpoint's schedule was {saved_name}, this FlatPerturb's is "
                    f"{_callable_name(current)}. Build it with the same callable before "
                    "loading (schedules are compared by qualified name)."
                )
            schedule = current
        else:
            _check_schedule(schedule, total_steps, where=where)
        if own["resample"] not in _RESAMPLE:
            raise ValueError(
                f"Invalid state_dict['flatopt']['resample']: {own['resample']!r}; expected "
                "'step' or 'call'."
            )
        if not isinstance(own["rank_noise"], bool):
            raise TypeError(
                f"Invalid state_dict['flatopt']['rank_noise']: {own['rank_noise']!r}; expected "
                "True or False."
            )
        return {
            "seed": seed,
            "step": _check_count(own["num_steps"], "num_steps"),
            "draw": _check_count(own["draw"], "draw"),
            "sigma": sigma,
            "schedule": schedule,
            "total_steps": total_steps,
            "resample": own["resample"],
            "rank_noise": own["rank_noise"],
        }

    def _replaced_settings(self, settings: dict[str, Any]) -> list[str]:
        """The noise settings a checkpoint changes, as ``name: ours -> theirs``."""
        state = self._state
        names = ["sigma", "schedule", "total_steps", "resample", "rank_noise"]
        if state.seed_given:  # a seed drawn at construction is meant to be replaced
            names.append("seed")
        changed = []
        for name in names:
            ours, theirs = getattr(state, name), settings[name]
            if ours is not theirs and ours != theirs:
                changed.append(f"{name}: this FlatPerturb's {ours!r}, the checkpoint's {theirs!r}")
        return changed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict`; the checkpoint's noise settings replace the current ones.

        The ``"flatopt"`` entry is checked whole first (types and ranges, by the
        constructor's rules) and loading is atomic: on any error nothing changes, the wrapped
        optimizer included. When the checkpoint's σ, schedule, total_steps, resample,
        rank_noise or seed (a seed passed to the constructor; a drawn one is replaced
        silently) differ from this wrapper's, it warns once, naming each: the checkpoint's
        win. A state dict written by the bare wrapped optimizer (no ``"flatopt"`` entry)
        loads the optimizer state only, keeps flatopt's seed and step count, and warns.

        Hooks registered with ``register_load_state_dict_pre_hook`` and
        ``register_load_state_dict_post_hook`` run as on any ``torch.optim.Optimizer``: each
        pre-hook gets a shallow copy of ``state_dict`` and may return a replacement; the
        post-hooks run once the state is loaded.

        Raises:
            RuntimeError: the perturbation is armed (explicit mode).
            ValueError: a bad or missing entry, or a callable schedule that differs from the
                checkpoint's (compared by qualified name).
            TypeError: ``state_dict`` is not a dict, or an entry has the wrong type.
        """
        state = self._state
        if state.arming is not None and not state.arming.auto:
            raise RuntimeError("load_state_dict() while perturbed; call opt.restore() first.")
        state_dict = self._to_load(state_dict)
        own = state_dict.get("flatopt")
        settings = self._check_own(own) if own is not None else None
        self._load_inner(state_dict, "flatopt")
        state.disarm()  # an auto-armed step belongs to the old step count
        if settings is None:
            warnings.warn(
                "state_dict has no 'flatopt' entry (written by the bare optimizer?): loaded the "
                f"optimizer state; the noise keeps seed={state.seed} and "
                f"num_steps={state.step}.",
                stacklevel=2,
            )
        else:
            changed = self._replaced_settings(settings)
            if changed:
                warnings.warn(
                    "load_state_dict() replaced noise settings this FlatPerturb was built with "
                    f"by the checkpoint's ({'; '.join(changed)}): the checkpoint's win. Build "
                    "FlatPerturb with the checkpoint's settings, or edit "
                    "state_dict['flatopt'] before loading to keep yours.",
                    stacklevel=2,
                )
            for key, value in settings.items():
                setattr(state, key, value)
            state.seed_given = True
            state.stds = {}
            state.perturbed_step, state.calls_step, state.model_forwards = False, 0, 0
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- copies and pickles -----------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self._state
        if state.arming is not None and not state.arming.auto:
            raise RuntimeError(
                "Cannot copy or pickle a FlatPerturb while it is perturbed; call opt.restore() "
                "first."
            )
        return {
            "optimizer": self._inner,
            "model": state.model,
            "adapters": state.adapters,
            "settings": {
                "sigma": state.sigma,
                "schedule": state.schedule,
                "total_steps": state.total_steps,
                "seed": state.seed,
                "resample": state.resample,
                "rank_noise": state.rank_noise,
                "auto": state.auto,
            },
            "progress": {"step": state.step, "draw": state.draw, "seed_given": state.seed_given},
        }

    def __setstate__(self, saved: dict[str, Any]) -> None:
        # Rebuilt from its parts: the copy finds the (copied) model's targets and hooks anew.
        settings = saved["settings"]
        self.__init__(saved["optimizer"], saved["model"], adapters=saved["adapters"], **settings)
        for key, value in saved["progress"].items():
            setattr(self._state, key, value)

    def __repr__(self) -> str:
        state = self._state
        schedule = getattr(state.schedule, "__name__", None) or repr(state.schedule)
        if isinstance(state.schedule, str):
            schedule = repr(state.schedule)
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return (
            f"FlatPerturb (\n"
            f"  sigma: {state.sigma:g} (now {self.sigma:.4g})\n"
            f"  schedule: {schedule}, total_steps: {state.total_steps}\n"
            f"  resample: {state.resample!r}, rank_noise: {state.rank_noise}, "
            f"seed: {state.seed}, auto: {state.auto}\n"
            f"  num_steps: {state.step}, perturbed: {self.is_perturbed}\n"
            f"  targets: {len(state.sites)} layers, {self._num_weights():,} weights\n"
            f"  optimizer:\n{inner}\n)"
        )

    def _num_weights(self) -> int:
        return sum(rows * fan_in for rows, fan_in in (s.logical_shape for s in self._state.sites))


def unwrap(optimizer: Any) -> FlatPerturb:
    """Return the `FlatPerturb` inside the wrappers frameworks put around optimizers.

    Lightning's ``LightningOptimizer`` and Accelerate's ``AcceleratedOptimizer`` (and
    anything else that keeps the optimizer in ``._optimizer`` or ``.optimizer``) do not expose
    `FlatPerturb.perturb` and friends; this finds the FlatPerturb they wrap. With
    ``auto=True`` nothing needs reaching.

    Raises:
        TypeError: no FlatPerturb was found inside ``optimizer``.

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=2)
        >>> opt = FlatPerturb(torch.optim.SGD(net.parameters(), lr=0.1), net, total_steps=10)
        >>> class Wrapper:  # what a framework hands back
        ...     def __init__(self, optimizer):
        ...         self.optimizer = optimizer
        >>> unwrap(Wrapper(opt)) is opt
        True
    """
    found, current, seen = None, optimizer, set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, FlatPerturb):
            found = current
        inner = current.__dict__.get("_optimizer") if hasattr(current, "__dict__") else None
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(current, "optimizer", None)
        inner = _zero.unwrap_optimizer(inner)  # DeepSpeed's ZeRO optimizer holds the torch one
        current = inner if isinstance(inner, torch.optim.Optimizer) else None
    if found is None:
        raise TypeError(
            f"No FlatPerturb inside {type(optimizer).__name__}: pass the optimizer your "
            "framework wraps, built as flatopt.FlatPerturb(inner, model, ...)."
        )
    return found
