"""Never silently stuck: the model trains, but FlatPerturb counts no step.

When something other than FlatPerturb steps the model (an optimizer it does not wrap: one that a
DeepSpeed config's ``"optimizer"`` section builds, or the one the HF Trainer builds under
DeepSpeed in place of ``optimizers=(opt, None)``), flatopt's step count never moves: every step
sees the noise of the same step, σ_0 = 0 on the default ramp. A forward pre-hook on the model
takes, at each training forward, a fingerprint of one trainable parameter: its version counter
and address (DeepSpeed writes its partitions through ``.data``, which moves neither, so there a
copy of the values too). The fingerprint is re-based whenever FlatPerturb's step count moves; a
change with no FlatPerturb step in between, seen twice, warns once, naming the fix.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import Tensor

from . import _zero

__all__ = ["watch"]

_CHANGES = 2  # changes with no step before warning: one may be a user's own edit of the weights


def _fingerprint(param: Tensor) -> tuple:
    stored = getattr(param, "ds_tensor", None)
    stored = param if stored is None else stored  # ZeRO-3: this rank's partition
    if _zero.is_partitioned(param) or hasattr(param, "_hp_mapping"):
        return (stored._version, stored.data_ptr(), stored.detach().clone())
    return (stored._version, stored.data_ptr(), None)


def _same(a: tuple, b: tuple) -> bool:
    if a[:2] != b[:2]:
        return False
    return a[2] is None or (a[2].shape == b[2].shape and torch.equal(a[2], b[2]))


class _StuckWatch:
    """The model's forward pre-hook (see the module docstring). A copy is inert."""

    __slots__ = ("__weakref__", "changes", "owner", "param", "print", "step")

    def __init__(self, flat: Any = None, param: Optional[Tensor] = None):
        self.owner = weakref.ref(flat) if flat is not None else None
        self.param = param
        self.step: Optional[int] = None
        self.print: Optional[tuple] = None
        self.changes = 0

    def __reduce__(self) -> tuple:
        return (_StuckWatch, ())

    def __call__(self, module: Any, args: Any) -> None:
        if not module.training or self.owner is None or torch.compiler.is_compiling():
            return
        flat = self.owner()
        if flat is None or flat._state.taken_by is not None or "stuck" in flat._state.warned:
            return  # said once: nothing more to watch for
        state, now = flat._state, _fingerprint(self.param)
        if self.step != state.step or self.print is None:
            self.step, self.print, self.changes = state.step, now, 0
            return
        if _same(now, self.print):
            return
        self.print = now
        if state.in_step:  # a closure re-evaluated inside the step (LBFGS)
            return
        self.changes += 1
        if self.changes >= _CHANGES:
            state.warn_once("stuck", _message(state))


def _message(state: Any) -> str:
    return (
        "The model's trainable parameters changed across its training forwards while "
        f"FlatPerturb counted no step (num_steps stays {state.step}, sigma_t = "
        f"{state.sigma_t():.3g}): something other than FlatPerturb trains the model, and the "
        "noise schedule is stuck. Step the model through the FlatPerturb: call opt.step(), or "
        "hand the FlatPerturb (not another optimizer) to the framework. Under DeepSpeed, drop "
        'the config\'s "optimizer" section and pass deepspeed.initialize(optimizer=opt) (or '
        "the optimizer it wraps); the HF Trainer under DeepSpeed replaces optimizers=(opt, "
        "None) by an optimizer of its own: pass optimizer_cls_and_kwargs="
        "flatopt.integrations.trainer_optimizer(model, args) instead."
    )


def _watched(flat: Any) -> Optional[Tensor]:
    """One trainable parameter of the model, preferably one the wrapped optimizer holds."""
    roots, _ = flat._state.roots()
    trainable = [p for root in roots for p in root.parameters() if p.requires_grad]
    held = {id(p) for group in flat._inner.param_groups for p in group["params"]}
    return next((p for p in trainable if id(p) in held), trainable[0] if trainable else None)


def watch(flat: Any) -> None:
    """Install a new FlatPerturb's hook on its model (dropping the inert ones a copy or a dead
    or replaced wrapper left there)."""
    param = _watched(flat)
    roots, _ = flat._state.roots()
    for root in roots:
        hooks = root._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, _StuckWatch):
                owner = hook.owner() if hook.owner is not None else None
                if owner is None or owner._state.taken_by is not None or owner is flat:
                    del hooks[key]
        if param is not None:
            root.register_forward_pre_hook(_StuckWatch(flat, param))
