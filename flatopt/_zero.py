"""DeepSpeed ZeRO, recognised by duck typing (deepspeed is never imported here).

Two things differ under DeepSpeed's engine:

- **ZeRO-3 partitions every weight.** Outside a forward a partitioned weight is an empty
  ``(0,)`` tensor with the full shape in ``ds_shape``; DeepSpeed's own module hooks gather it
  into ``param.data`` before the forward and free it after. flatopt reads the shape from
  ``ds_shape``, and for the length of the forward points the parameter's ``.data`` at a fresh
  W + ε computed from the whole gathered W (so the noise is bitwise unsharded flatopt's),
  then back at DeepSpeed's gathered W. The partition is never written, and the parameter
  object stays the one DeepSpeed manages, so the order of flatopt's and DeepSpeed's hooks does
  not matter: a weight not gathered yet is gathered here the way DeepSpeed gathers a
  parameter read outside its own hooks. Backward regenerates W + ε from the weight DeepSpeed
  gathers again for the backward.
- **The engine steps the optimizer itself, one parameter group (ZeRO-3: sub-group) at a
  time.** ``engine.step()`` calls the wrapped optimizer's ``step()`` once per group and never
  calls FlatPerturb's. A step pre-hook on the wrapped optimizer counts the first of these
  calls as one FlatPerturb step (the same checks and bookkeeping as ``opt.step()``); the
  others, and those DeepSpeed makes on a FlatPerturb it was handed as its optimizer, belong to
  the same step until flatopt arms again (a perturb(), or the next training forward).

Outside DeepSpeed the same hook catches a wrapped optimizer stepped directly (a framework
handed the inner optimizer): the step is counted, with a warning naming the fix.

- **The engine checkpoints its ZeRO optimizer, which saves the state dict of the torch
  optimizer inside it** (``engine.save_checkpoint``: ``zero_pp_rank_*_optim_states.pt``). When
  that optimizer is the FlatPerturb (handed to ``deepspeed.initialize``, or built by the HF
  Trainer), its ``"flatopt"`` entry is saved and loaded with it. When it is the optimizer
  FlatPerturb wraps, hooks on that optimizer add the entry while a ZeRO optimizer saves it and
  load it into the FlatPerturb while one loads it; outside DeepSpeed they do nothing.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import Tensor

from . import _swap

__all__ = [
    "ZeroEntry",
    "full_shape",
    "in_deepspeed_step",
    "is_partitioned",
    "later_group",
    "swap_pre",
    "unwrap_optimizer",
    "watch",
]

# -- ZeRO-3 partitioned weights -------------------------------------------------------------


def is_partitioned(tensor: Any) -> bool:
    """A ZeRO-3 parameter: DeepSpeed keeps its shard in ``ds_tensor``, its shape in
    ``ds_shape``, and gathers it into ``.data`` around the forward of the modules using it."""
    return isinstance(tensor, Tensor) and hasattr(tensor, "ds_shape") and hasattr(tensor, "ds_id")


def full_shape(tensor: Tensor) -> torch.Size:
    """The shape of the whole weight: ``ds_shape`` for a ZeRO-3 partition."""
    return torch.Size(tensor.ds_shape) if is_partitioned(tensor) else tensor.shape


def _available(param: Tensor) -> bool:
    return param.ds_status.name == "AVAILABLE" and param.numel() == param.ds_numel


def _gather(param: Tensor, name: str) -> None:
    """Gather a ZeRO-3 weight that DeepSpeed has not fetched yet (flatopt's hook ran before
    DeepSpeed's), as DeepSpeed gathers a parameter read outside its own hooks."""
    if param.ds_status.name == "NOT_AVAILABLE":
        param.all_gather()
    if not _available(param):
        raise RuntimeError(
            f"Module {name!r}: its ZeRO-3 weight is not gathered inside its forward "
            f"(status {param.ds_status.name}, {param.numel()} of {param.ds_numel} elements). "
            "Call the model through the DeepSpeed engine (engine(x)), so that DeepSpeed "
            "gathers each layer's weight for its forward."
        )


class ZeroEntry:
    """One call in flight of a ZeRO-3 weight: ``weight`` is DeepSpeed's gathered W, which
    ``.data`` points back at after the forward (unless DeepSpeed released it meanwhile)."""

    __slots__ = ("hooks", "param", "perturbed", "swap", "weight")

    def __init__(self, swap: Any, param: Tensor, gathered: Tensor, perturbed: Tensor, hooks: Any):
        self.swap = swap
        self.param = param
        self.weight = gathered
        self.perturbed = perturbed
        self.hooks = hooks

    def holds_perturbed(self) -> bool:
        data = self.param.data
        return data.data_ptr() == self.perturbed.data_ptr() and data.shape == self.perturbed.shape

    def post(self) -> None:
        _swap._pop_hooks()
        if self.holds_perturbed():
            self.param.data = self.weight

    def unwind(self) -> None:
        if self.holds_perturbed():
            self.param.data = self.weight
        top = _swap._top_hooks(False)
        if top is not None and top[0] is self.hooks:
            _swap._pop_hooks()


def swap_pre(swap: Any, param: Tensor) -> ZeroEntry:
    """The forward pre-hook's swap for a ZeRO-3 weight: ``param.data`` becomes W + ε."""
    reader = swap.reader
    _gather(param, reader.name)
    gathered = param.data  # DeepSpeed's whole W, a plain tensor
    perturbation = swap.arming.perturbation(swap.site, gathered)
    perturbed = perturbation.apply(gathered)
    # What autograd saves of W + ε (the parameter itself, or a view of it) is regenerated from
    # the parameter, which DeepSpeed gathers again before the module's backward.
    pack = _swap._packer(perturbation, param, perturbed, reader.name)
    _swap._push_hooks(pack, _unpack)
    entry = ZeroEntry(swap, param, gathered, perturbed, pack)
    param.data = perturbed  # the partition (ds_tensor) and DeepSpeed's buffer stay untouched
    swap.arming.calls += 1
    return entry


def _unpack(packed: Any) -> Tensor:
    if isinstance(packed, _swap._Token) and is_partitioned(packed.weight):
        param = packed.weight
        if not _available(param):
            raise RuntimeError(
                f"Backward needs W + ε of {packed.name!r}, but DeepSpeed has not gathered its "
                f"ZeRO-3 weight again (status {param.ds_status.name}). Run backward through the "
                "engine (engine.backward(loss)) and call the model as engine(x)."
            )
    return _swap._unpack(packed)


# -- optimizers and steps -------------------------------------------------------------------


def managed(roots: Any) -> bool:
    """Whether DeepSpeed's engine manages the parameters of ``roots``: ZeRO-3 partitions them
    (``ds_id``), ZeRO-1/2 link them to the flat partitions its optimizer steps
    (``_hp_mapping``)."""
    params = (p for root in roots for p in root.parameters())
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params)


def is_zero_optimizer(optimizer: Any) -> bool:
    """One of DeepSpeed's ZeRO optimizers (stage 1/2 or 3), which wrap a torch optimizer."""
    module = type(optimizer).__module__ or ""
    return (
        module.startswith("deepspeed.")
        and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)
        and hasattr(optimizer, "step")
    )


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a DeepSpeed ZeRO optimizer (``engine.optimizer``), which
    FlatPerturb wraps instead: ``engine.step()`` steps it, and flatopt counts that."""
    return optimizer.optimizer if is_zero_optimizer(optimizer) else optimizer


_STEP_NAMES = frozenset({"step", "_optimizer_step"})


def in_deepspeed_step() -> bool:
    """Whether a DeepSpeed ZeRO optimizer's ``step()`` is running in this thread."""
    return _in_zero_method(_STEP_NAMES)


def _in_zero_method(names: Any = None) -> bool:
    """Whether a method of a DeepSpeed ZeRO optimizer (one of ``names``; None: any) is
    running in this thread."""
    if "deepspeed" not in sys.modules:
        return False
    frame = sys._getframe(2)
    for _ in range(24):
        if frame is None:
            return False
        if names is None or frame.f_code.co_name in names:
            owner = frame.f_locals.get("self")
            if owner is not None and is_zero_optimizer(owner):
                return True
        frame = frame.f_back
    return False


# The FlatPerturb step a group-by-group step was counted as, per FlatPerturb state.
_COUNTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same_step(state: Any) -> bool:
    """A step of the wrapped optimizer that belongs to the step already counted: no
    perturb() and no training forward since (``draw`` counts armings within a step)."""
    if _COUNTED.get(state) != state.step or state.draw != 0:
        return False
    return not any(reader.slot.clean for site in state.sites for reader in site.readers)


def later_group(flat: Any) -> bool:
    """FlatPerturb.step() called by DeepSpeed, which hands it one parameter group at a time:
    True for the second and later groups of one step, which only step the wrapped optimizer.
    The first call is counted as the step; `_same_step` then holds until flatopt arms again."""
    state = flat._state
    if not in_deepspeed_step():
        return False
    if _same_step(state):
        return True
    refuse_armed(flat)
    _COUNTED[state] = state.step + 1
    return False


def refuse_armed(flat: Any) -> None:
    """engine.step() inside ``with opt.perturbed():``: restore, and say where it goes."""
    state = flat._state
    if state.arming is None or state.arming.auto:
        return
    flat._restore(warn=False)
    raise RuntimeError(
        "DeepSpeed's engine.step() ran while the perturbation is armed (inside `with "
        "opt.perturbed():`); flatopt restored it and did not take the step. Call engine.step() "
        "after the block that holds engine(x) and engine.backward(loss). With Accelerate, "
        "whose accelerator.backward() steps the engine itself, build FlatPerturb(..., "
        "auto=True) and drop perturbed()."
    )


class _NoStep:
    """Stands for the wrapped optimizer's ``step`` while FlatPerturb counts a step that
    someone else is taking: the real step is already running."""

    def __call__(self, closure: Any = None) -> None:
        return None


class _Watch:
    """A step pre-hook on the wrapped optimizer: when someone other than FlatPerturb steps it
    (DeepSpeed's engine.step()), count that step. A copy is inert."""

    __slots__ = ("__weakref__", "owner")

    def __init__(self, flat: Any = None):
        self.owner = weakref.ref(flat) if flat is not None else None

    def __reduce__(self) -> tuple:
        return (_Watch, ())

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        flat = self.owner() if self.owner is not None else None
        if flat is None or flat._inner is not optimizer or flat._state.in_step:
            return
        state = flat._state
        if _same_step(state):
            return  # another parameter group of the step already counted
        if in_deepspeed_step():
            refuse_armed(flat)
        else:
            state.warn_once(
                "inner stepped",
                f"The optimizer FlatPerturb wraps ({type(optimizer).__name__}) was stepped "
                "directly, not through FlatPerturb.step(); flatopt counted it as a step of the "
                "noise schedule. Hand the FlatPerturb itself to the framework (e.g. "
                "accelerator.prepare(opt)), or call opt.step().",
            )
        _count(flat)


def _count(flat: Any) -> None:
    """Run FlatPerturb.step()'s checks and bookkeeping without stepping the wrapped optimizer
    a second time (its real step is the one running), and remember this step is counted."""
    inner, state = flat._inner, flat._state
    saved = inner.__dict__.get("step", _NoStep)
    inner.__dict__["step"] = _NoStep()
    try:
        flat.step()
    finally:
        if saved is _NoStep:
            inner.__dict__.pop("step", None)
        else:
            inner.__dict__["step"] = saved
    _COUNTED[state] = state.step


# -- checkpoints: the "flatopt" entry in what a ZeRO optimizer saves -------------------------


class _Hook:
    """A hook of a FlatPerturb on its wrapped optimizer; a copy is inert."""

    __slots__ = ("__weakref__", "busy", "owner")

    def __init__(self, flat: Any = None):
        self.owner = weakref.ref(flat) if flat is not None else None
        self.busy = False

    def __reduce__(self) -> tuple:
        return (type(self), ())

    def flat(self, optimizer: Any) -> Any:
        flat = self.owner() if self.owner is not None else None
        return flat if flat is not None and flat._inner is optimizer else None


class _SaveEntry(_Hook):
    """State-dict post-hook: a ZeRO optimizer saving the wrapped optimizer's state saves the
    FlatPerturb's ``"flatopt"`` entry with it."""

    __slots__ = ()

    def __call__(self, optimizer: Any, state_dict: dict) -> None:
        flat = self.flat(optimizer)
        if flat is None or self.busy or not _in_zero_method():
            return
        self.busy = True  # FlatPerturb.state_dict() reads the wrapped optimizer's again
        try:
            state_dict["flatopt"] = flat.state_dict()["flatopt"]
        finally:
            self.busy = False


class _LoadEntry(_Hook):
    """Load-state-dict pre-hook: a ZeRO optimizer loading a state with a ``"flatopt"`` entry
    into the wrapped optimizer loads that entry into the FlatPerturb (checked whole first)."""

    __slots__ = ()

    def __call__(self, optimizer: Any, state_dict: dict) -> Any:
        flat = self.flat(optimizer)
        if flat is None or "flatopt" not in state_dict or not _in_zero_method():
            return None
        # FlatPerturb.load_state_dict's checks and bookkeeping; the wrapped optimizer's state
        # is the one being loaded right now, so its load_state_dict is skipped there.
        saved = optimizer.__dict__.get("load_state_dict", _NoStep)
        optimizer.__dict__["load_state_dict"] = _NoStep()
        try:
            flat.load_state_dict(
                {"state": {}, "param_groups": [], "flatopt": state_dict["flatopt"]}
            )
        finally:
            if saved is _NoStep:
                optimizer.__dict__.pop("load_state_dict", None)
            else:
                optimizer.__dict__["load_state_dict"] = saved
        return {key: value for key, value in state_dict.items() if key != "flatopt"}


def watch(flat: Any) -> None:
    """Install a new FlatPerturb's hooks on its wrapped optimizer: the step pre-hook, and the
    checkpoint hooks (dropping the inert ones a copy or a dead wrapper left there)."""
    inner = flat._inner
    for hooks in (
        inner._optimizer_step_pre_hooks,
        inner._optimizer_state_dict_post_hooks,
        inner._optimizer_load_state_dict_pre_hooks,
    ):
        for key, hook in list(hooks.items()):
            if isinstance(hook, (_Watch, _Hook)) and (hook.owner is None or hook.owner() is None):
                del hooks[key]
    inner.register_step_pre_hook(_Watch(flat))
    inner.register_state_dict_post_hook(_SaveEntry(flat))
    inner.register_load_state_dict_pre_hook(_LoadEntry(flat))
