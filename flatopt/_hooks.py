"""The hooks flatopt leaves on a target module, and what they do when a call arrives.

Every target module carries a forward pre-hook, a forward hook and a state-dict pre-hook,
installed once and sharing one `_Slot`: the swaps armed on the module and its calls in flight.
Unarmed, the pre-hook returns after one attribute test. Armed, it asks each armed swap for its
W + P (`flatopt._swap`) and the forward hook puts W back. A `_Guard` around the module's call
undoes whatever a KeyboardInterrupt left; calls from a second thread, calls inside the module's
own forward and forwards re-run by activation checkpointing are handled here too. The hooks are
instances of module-level classes, so a model carrying them pickles and deep-copies; a copy
gets fresh, empty hooks.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from ._swap import _Entry, _Swap

__all__ = ["drop_hooks", "find_slot", "outside_backward", "remove_hooks", "root_hook"]


class _Slot:
    """flatopt's state on one module: the swaps armed on it and the calls now in flight.

    A pickled or copied slot comes back empty: what is armed belongs to the original model.
    """

    __slots__ = (
        "__weakref__",
        "auto",
        "calls",
        "clean",
        "frames",
        "installed",
        "owner",
        "swaps",
        "thread",
        "watch",
    )

    def __init__(self) -> None:
        self.swaps: dict[str, _Swap] = {}  # param name -> the armed swap
        self.frames: list[list[Any]] = []  # one entry per call in flight
        self.thread: Optional[int] = None  # the thread whose armed calls are in flight
        self.calls = 0  # armed calls in flight under the `_Guard` (nested calls count each)
        self.auto = False  # a FlatPerturb(auto=True) arms itself from this module's forward
        self.owner: Optional[weakref.ref] = None  # the FlatPerturb state the module belongs to
        self.installed = True
        self.watch = False  # an explicit FlatPerturb counts training forwards left clean
        self.clean = 0

    def armed(self, module: nn.Module) -> bool:
        return bool(self.swaps) or (self.auto and module.training)

    def __reduce__(self) -> tuple:
        return (_Slot, ())


class _PreHook:
    """The forward pre-hook: swaps W + ε in while armed; a single test while not."""

    __slots__ = ("slot",)

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module: nn.Module, args: Any) -> None:
        slot = self.slot
        if slot.swaps or (slot.auto and module.training):
            # Eager calls go straight in; under dynamo the disabled copy runs (a graph break).
            (_pre_compiled if _is_compiling() else _pre)(slot, module)
        elif slot.watch and module.training and torch.is_grad_enabled() and not _is_compiling():
            slot.clean += 1  # a training forward outside perturb()/restore()

    def __reduce__(self) -> tuple:
        return (_PreHook, (self.slot,))


class _PostHook:
    """The forward hook: puts W back (and adds output-side noise for quantized weights)."""

    __slots__ = ("slot",)

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self.slot.frames:
            post = _post_compiled if _is_compiling() else _post
            return post(self.slot, module, args, kwargs, output)
        return None

    def __reduce__(self) -> tuple:
        return (_PostHook, (self.slot,))


class _StateDictHook:
    """Before a module's state dict is taken: undo a call whose forward hook never ran (a
    KeyboardInterrupt inside an auto-armed forward), so the checkpoint holds W."""

    __slots__ = ("slot",)

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        if self.slot.frames:
            _unwind(self.slot)

    def __reduce__(self) -> tuple:
        return (_StateDictHook, (self.slot,))


class _Guard:
    """A target module's call (``module._compiled_call_impl``, which ``Module.__call__`` runs in
    eager mode): whatever ends the call, a KeyboardInterrupt included, nothing it armed stays.

    torch runs the forward hook (``always_call=True``) only when the forward raises an
    ``Exception``; a KeyboardInterrupt or SystemExit would leave W + ε in the module and the
    saved-tensor hooks pushed. ``Module.__getstate__`` drops the guard, so pickles and copies
    never carry it; under torch.compile, dynamo calls ``_call_impl`` itself.
    """

    __slots__ = ("inner", "module", "slot")

    def __init__(self, slot: _Slot, module: nn.Module, inner: Optional[Callable[..., Any]]):
        self.slot = slot
        self.module = weakref.ref(module)
        self.inner = inner  # a _compiled_call_impl that was there before (module.compile())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        call = self.inner if self.inner is not None else module._call_impl
        slot = self.slot
        if not slot.armed(module):
            return call(*args, **kwargs)
        mine = slot.thread is None or slot.thread == threading.get_ident()
        if not mine:
            return call(*args, **kwargs)  # refused by the pre-hook, with the reason
        depth = len(slot.frames)
        slot.calls += 1
        try:
            return call(*args, **kwargs)
        except BaseException:
            if slot.thread == threading.get_ident():
                while len(slot.frames) > depth:
                    _undo(slot.frames.pop())
                if not slot.frames:
                    slot.thread = None
            raise
        finally:
            slot.calls -= 1


def guard(slot: _Slot, module: nn.Module) -> None:
    """Put the `_Guard` of ``slot`` on ``module`` unless it is there: while the module is
    armed, or arms itself (``auto=True``). Unarmed, its calls pay nothing for it."""
    current = module.__dict__.get("_compiled_call_impl")
    if isinstance(current, _Guard) and current.slot is slot:
        return
    module._compiled_call_impl = _Guard(slot, module, current)


def unguard(module: nn.Module) -> None:
    """Take the `_Guard` off ``module`` (putting back what it wrapped, e.g. module.compile())."""
    current = module.__dict__.get("_compiled_call_impl")
    if isinstance(current, _Guard):
        if current.inner is None:
            del module.__dict__["_compiled_call_impl"]
        else:
            module._compiled_call_impl = current.inner


def guard_while_armed(slot: _Slot, module: nn.Module) -> None:
    """The guard's rule: on while the slot has swaps or arms itself, off otherwise."""
    if slot.swaps or slot.auto:
        guard(slot, module)
    elif not slot.frames:
        unguard(module)


_claim = threading.Lock()


def _concurrent(slot: _Slot, module: nn.Module) -> RuntimeError:
    return RuntimeError(
        f"{type(module).__name__} is perturbed and was called from two threads at once: each "
        "call swaps W + ε into the module, so concurrent calls would see each other's weights. "
        "Run the perturbed forwards of one model on one thread (one model copy per thread, "
        "or evaluate the threads' batches after opt.restore())."
    )


_is_compiling = torch.compiler.is_compiling


def _pre(slot: _Slot, module: nn.Module) -> None:
    me = threading.get_ident()
    with _claim:
        if slot.thread is not None and slot.thread != me:
            raise _concurrent(slot, module)
        slot.thread = me
    try:
        if slot.frames:
            if slot.calls > 1:  # the module is called inside its own forward: keep its W + ε
                slot.frames.append(_nested(slot, module))
                return
            _unwind(slot)  # a forward interrupted outside the guard (compiled) left W + ε
        if not slot.swaps:
            owner = slot.owner() if slot.owner is not None else None
            if owner is None or not slot.auto:
                slot.auto = False
                return
            owner.auto_arm()
            if not slot.swaps:
                return
        frame: list[Any] = []
        try:
            for swap in slot.swaps.values():
                frame.append(swap.pre(module))
        except BaseException:
            _undo(frame)
            raise
        slot.frames.append(frame)
    finally:
        if not slot.frames:
            slot.thread = None


def _nested(slot: _Slot, module: nn.Module) -> list[Any]:
    """The frame of a call made inside the module's own forward: the outer call's W + ε stays
    in place for both (the outer saved-tensor hooks cover the inner call's saved tensors)."""
    outer: dict[_Swap, _Entry] = {}
    for frame in reversed(slot.frames):  # the innermost call that swapped each weight in
        for entry in frame:
            if entry is not None:
                outer.setdefault(entry.swap, entry)
    nested: list[Any] = []
    try:
        for swap in slot.swaps.values():
            entry = outer.get(swap)
            if entry is not None and entry.perturbed is not None and entry.holds_perturbed():
                nested.append(None)
            else:
                nested.append(swap.pre(module))
    except BaseException:
        _undo(nested)
        raise
    return nested


def _post(slot: _Slot, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    if slot.thread != threading.get_ident():
        return output  # another thread's call in flight; this one was refused in its pre-hook
    frame = slot.frames.pop()
    try:
        for entry in reversed(frame):
            if entry is not None:
                output = entry.swap.post(entry, args, kwargs, output)
    finally:
        if not slot.frames:
            slot.thread = None
    return output


_pre_compiled: Callable[..., Any] = _pre  # made torch.compile-proof when hooks are installed
_post_compiled: Callable[..., Any] = _post


def _compile_proof() -> None:
    # torch.compile must run the armed path eagerly, frames below it included: it draws noise
    # and enters saved-tensor hooks. The unarmed test in the hooks is plain Python that
    # compiles away, and costs no wrapper call. Deferred to the first hook:
    # torch.compiler.disable imports torch._dynamo.
    global _pre_compiled, _post_compiled, _next_draw_compiled
    if _pre_compiled is _pre:
        disable = torch.compiler.disable
        _pre_compiled, _post_compiled = disable(_pre), disable(_post)
        _next_draw_compiled = disable(_next_draw)


def _undo(frame: list[Any]) -> None:
    for entry in reversed(frame):
        if entry is not None:
            entry.swap.unwind(entry)


def _unwind(slot: _Slot) -> None:
    while slot.frames:
        _undo(slot.frames.pop())
    slot.thread = None


def find_slot(module: nn.Module) -> Optional[_Slot]:
    """The slot of flatopt's hooks on ``module``, or None if it has none."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _PreHook):
            return hook.slot
    return None


def _slot(module: nn.Module) -> _Slot:
    slot = find_slot(module)
    if slot is None:
        _compile_proof()
        slot = _Slot()
        module.register_forward_pre_hook(_PreHook(slot))
        module.register_forward_hook(_PostHook(slot), with_kwargs=True, always_call=True)
        module.register_state_dict_pre_hook(_StateDictHook(slot))
    return slot


def remove_hooks(model: nn.Module) -> int:
    """Take flatopt's forward hooks off every module of ``model``; return how many modules.

    A FlatPerturb built on the model stops perturbing it: its next `perturb` raises, and with
    ``auto=True`` its next ``step()`` warns that nothing was perturbed. Build a new FlatPerturb
    to perturb the model again.

    Raises:
        RuntimeError: a perturbation is armed on the model (restore it first).

    Example:
        >>> import flatopt
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=2)
        >>> opt = flatopt.FlatPerturb(torch.optim.SGD(net.parameters(), lr=0.1), net, sigma=0.1,
        ...                           schedule="constant")
        >>> flatopt.remove_hooks(net)
        1
    """
    modules = [model] if isinstance(model, nn.Module) else list(model)
    found = []
    for root in modules:
        for module in root.modules():
            slot = find_slot(module)
            if slot is not None:
                if slot.swaps or slot.frames:
                    raise RuntimeError(
                        "remove_hooks() while a perturbation is armed on the model; call "
                        "opt.restore() (or leave `with opt.perturbed():`) first."
                    )
                found.append((module, slot))
    from ._stuck import _StuckWatch  # here, not at the top: _stuck needs the core loaded

    for root in modules:
        hooks = root._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, (_RootHook, _StuckWatch))]:
            del hooks[key]
    for module, _ in found:
        drop_hooks(module)
    return len(found)


def drop_hooks(module: nn.Module) -> None:
    """Take flatopt's hooks off one module (nothing may be armed on it)."""
    slot = find_slot(module)
    for hooks in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_pre_hooks):
        for key in [
            k for k, h in hooks.items() if isinstance(h, (_PreHook, _PostHook, _StateDictHook))
        ]:
            del hooks[key]
            for extra in (
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_forward_pre_hooks_with_kwargs",
            ):
                getattr(module, extra, {}).pop(key, None)
    unguard(module)
    if slot is not None:
        slot.installed = False
        slot.auto = False
        slot.owner = None
        slot.swaps.clear()


class _RootHook:
    """On the model itself, for ``auto=True, resample="call"``: each training forward of the
    model starts a new draw, as one perturb() per micro-batch would. A copy is inert."""

    __slots__ = ("owner",)

    def __init__(self, owner: Any = None):
        self.owner = weakref.ref(owner) if owner is not None else None

    def __call__(self, module: nn.Module, args: Any) -> None:
        if module.training and self.owner is not None:
            (_next_draw_compiled if _is_compiling() else _next_draw)(self)

    def __reduce__(self) -> tuple:
        return (_RootHook, ())


def _next_draw(hook: _RootHook) -> None:
    owner = hook.owner()
    if owner is not None and outside_backward():
        owner.next_draw()


_next_draw_compiled: Callable[..., Any] = _next_draw


def root_hook(model: nn.Module, owner: Any) -> None:
    """Install the `_RootHook` of ``owner`` on ``model``, replacing an inert one."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _RootHook):
            del model._forward_pre_hooks[key]
    model.register_forward_pre_hook(_RootHook(owner))


def outside_backward() -> bool:
    """True unless autograd is running a backward (e.g. re-running a checkpointed forward)."""
    return torch._C._current_graph_task_id() == -1
