"""How a layer's forward sees W + ε while W itself is never written.

Every target module carries two small forward hooks, installed once. While a perturbation is
armed, the pre-hook swaps the tensor the module reads for a fresh W + ε and the forward hook
swaps W back. Whatever autograd saves of W + ε is packed into a small token and regenerated bit
for bit from the seed when backward needs it, so no perturbed weight lives from the forward to
the backward. Unarmed, the hooks return after one attribute test.

The hooks are instances of module-level classes, so a model carrying them pickles and
deep-copies; a copy gets fresh, empty hooks.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import _zero
from ._output import OutputNoise, dequantized, is_dtensor, is_plain, layer_op
from .adapters import Target
from .noise import (
    _broadcast,
    _perturbed_weight,
    _row_norms,
    draw_noise,
    row_dim,
    std_scale,
)

__all__ = [
    "Arming",
    "Generators",
    "Site",
    "build_sites",
    "drop_hooks",
    "find_slot",
    "remove_hooks",
]

_C = torch._C._autograd
_push_hooks = _C._push_saved_tensors_default_hooks
_pop_hooks = _C._pop_saved_tensors_default_hooks
_top_hooks = _C._top_saved_tensors_default_hooks  # torch >= 2.8, hence flatopt's bound
_functorch = torch._C._functorch
_is_wrapped = _functorch.is_functorch_wrapped_tensor
_in_transform = _functorch.peek_interpreter_stack


def _unwrap(tensor: Any) -> Any:
    """The plain tensor inside torch.func's wrappers (the noise law treats it as a constant)."""
    while isinstance(tensor, Tensor) and _is_wrapped(tensor):
        tensor = _functorch.get_unwrapped(tensor)
    return tensor


def _owner(module: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    path, _, name = param_name.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def _read(owner: nn.Module, name: str) -> Tensor:
    value = owner._parameters.get(name)
    if value is None:
        value = owner._buffers.get(name)
        if value is None:
            value = owner.__dict__[name]
    return value


def _write(owner: nn.Module, name: str, value: Tensor) -> None:
    for store in (owner._parameters, owner._buffers):
        if name in store:
            store[name] = value
            return
    owner.__dict__[name] = value


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


class Reader:
    """One module that reads a site's weight: where the tensor lives and where it was found."""

    def __init__(self, name: str, target: Target, path: Sequence[tuple[nn.Module, str, nn.Module]]):
        self.name = name
        self.target = target
        self.owner, self.attr = _owner(target.module, target.param_name)
        self.path = tuple(path)  # (parent, child name, child) links from the root to the owner
        self.slot = _slot(target.module)
        self._ops: dict[type, Any] = {}
        padding = getattr(self.owner, "padding_idx", None)
        embedding = isinstance(self.owner, (nn.Embedding, nn.EmbeddingBag))
        self.keep = padding if embedding and padding is not None else None

    def read(self) -> Tensor:
        return _read(self.owner, self.attr)

    def in_place(self) -> bool:
        """The module is still where it was found, reached through the same parents."""
        return all(parent._modules.get(name) is child for parent, name, child in self.path)

    def op(self, weight: Tensor) -> Any:
        """The layer as a function of its weight, for output-side noise (quantized weights)."""
        kind = type(weight)
        if kind not in self._ops:
            self._ops[kind] = layer_op(self.owner, weight, self.target.transposed)
        return self._ops[kind]


class Site:
    """One perturbed weight: its name, index, layout, the modules that read it (several for
    tied weights, all seeing the same ε)."""

    def __init__(self, index: int, name: str, readers: Sequence[Reader]):
        self.index = index
        self.name = name
        self.readers = tuple(readers)
        self.target = self.readers[0].target
        self.transposed = self.target.transposed
        weight = self.readers[0].read()
        shape = _zero.full_shape(weight)  # a ZeRO-3 partition is (0,) outside its forward
        rows = shape[row_dim(weight, self.transposed)]
        self.logical_shape = (rows, shape.numel() // max(rows, 1))
        if not is_plain(weight) and not is_dtensor(weight):
            for reader in self.readers:
                self._check_quantized(reader, weight)

    def _check_quantized(self, reader: Reader, weight: Tensor) -> None:
        if reader.op(weight) is None or dequantized(weight) is None:
            raise ValueError(
                f"Module {reader.name!r}: {type(reader.target.module).__name__}."
                f"{reader.target.param_name} is a {type(weight).__name__} of dtype "
                f"{weight.dtype}. flatopt adds ε to plain floating weights, and applies it on "
                "the output side for quantized weights of linear, conv and embedding layers "
                "that can be dequantized (.dequantize()); this one is neither. Exclude the "
                "layer, or dequantize its base weight."
            )

    def std(self, sigma: float, weight: Tensor, unwrap: bool = False) -> Tensor:
        """The per-row noise std σ·‖W'_i‖/√n, from ``weight`` (the tensor the forward reads).

        ``unwrap``: inside torch.func transforms, read the plain tensors in their wrappers."""
        target = self.target
        grad = torch.is_grad_enabled()
        if grad:  # the row norms are constants (cheaper than a torch.no_grad() block)
            torch._C._set_grad_enabled(False)
        try:
            delta = _full(target.delta(), unwrap) if target.delta is not None else None
            dense = weight if is_plain(weight) else dequantized(weight)
            # Recomputed from W at every step, never cached: W may change in ways no version
            # counter sees (writes through .data, merges, a replaced Parameter).
            scale = std_scale(dense, sigma, self.transposed)
            return _row_norms(dense, delta, self.transposed, None, scale)
        finally:
            if grad:
                torch._C._set_grad_enabled(True)


def _path(
    roots: Sequence[nn.Module], indexed: bool, name: str, param_name: str
) -> list[tuple[nn.Module, str, nn.Module]]:
    """The (parent, child name, child) links from the scanned root to a weight's owner."""
    if not roots:
        return []
    if indexed:  # an iterable of modules: names start with the module's index
        head, _, name = name.partition(".")
        module = roots[int(head)]
    else:
        module = roots[0]
    parts = [p for p in name.split(".") if p] + param_name.split(".")[:-1]
    path = []
    for part in parts:
        child = module._modules[part]
        path.append((module, part, child))
        module = child
    return path


def build_sites(
    found: Sequence[tuple[str, Target]], roots: Sequence[nn.Module] = (), indexed: bool = False
) -> list[Site]:
    """Group the adapters' targets by the weight they read: one site per distinct weight.

    ``roots`` are the scanned modules (``indexed``: names start with the root's index), so that
    each target module can be checked later to be still where it was found.
    """
    groups: dict[int, list[tuple[str, Target]]] = {}
    for name, target in found:
        groups.setdefault(id(target.weight), []).append((name, target))
    sites = []
    for index, group in enumerate(groups.values()):
        (name, first), *tied = group
        for other_name, other in tied:
            if other.transposed != first.transposed:
                raise ValueError(
                    f"Modules {name!r} and {other_name!r} share one weight but their adapters "
                    "disagree on transposed=. A tied weight needs one layout for its rows: "
                    "claim it once (e.g. flatopt.dense(model.embed) and not the tied head), "
                    "or pass the same transposed= to both."
                )
        readers: dict[tuple[int, str], Reader] = {}  # two claims on one module count once
        for reader_name, target in group:
            key = (id(target.module), target.param_name)
            if key not in readers:
                path = _path(roots, indexed, reader_name, target.param_name)
                readers[key] = Reader(reader_name, target, path)
        sites.append(Site(index, name, list(readers.values())))
    return sites


# -- the hooks ------------------------------------------------------------------------------


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
            _pre_compiled(slot, module)
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
            return _post_compiled(self.slot, module, args, kwargs, output)
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


def _guard(slot: _Slot, module: nn.Module) -> None:
    """Put the `_Guard` of ``slot`` on ``module`` unless it is there (a copy lacks it)."""
    current = module.__dict__.get("_compiled_call_impl")
    if isinstance(current, _Guard) and current.slot is slot:
        return
    module._compiled_call_impl = _Guard(slot, module, current)


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
            if entry is not None and entry.perturbed is not None and _holds(entry):
                nested.append(None)
            else:
                nested.append(swap.pre(module))
    except BaseException:
        _undo(nested)
        raise
    return nested


def _holds(entry: Any) -> bool:
    """The module still reads the W + ε of ``entry`` (a ZeRO-3 weight holds it in .data)."""
    if isinstance(entry, _zero.ZeroEntry):
        return entry.holds_perturbed()
    return _read(entry.swap.reader.owner, entry.swap.reader.attr) is entry.perturbed


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
    _guard(slot, module)
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
    for root in modules:
        for key in [k for k, h in root._forward_pre_hooks.items() if isinstance(h, _RootHook)]:
            del root._forward_pre_hooks[key]
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
    guard = module.__dict__.get("_compiled_call_impl")
    if isinstance(guard, _Guard):
        if guard.inner is None:
            del module.__dict__["_compiled_call_impl"]
        else:
            module._compiled_call_impl = guard.inner
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
            _next_draw_compiled(self)

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


# -- one armed weight -----------------------------------------------------------------------


class _Token(NamedTuple):
    """What autograd keeps of W + ε: enough to regenerate it, and the view's geometry."""

    noise: Noise
    weight: Tensor
    version: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    name: str


class _Outer(NamedTuple):
    """A saved tensor handed to the saved-tensor hooks that were active around ours."""

    unpack: Callable[[Any], Tensor]
    packed: Any


class Noise:
    """One weight's noise for one draw: its std, seed, generator, layout and kept row."""

    __slots__ = ("generator", "keep", "scale", "seed", "std", "transposed")

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


class _Entry:
    """One call in flight of one armed weight: what to put back after it."""

    __slots__ = ("hooks", "perturbed", "swap", "weight")

    def __init__(self, swap: _Swap, weight: Tensor, perturbed: Optional[Tensor], hooks: Any):
        self.swap = swap
        self.weight = weight
        self.perturbed = perturbed
        self.hooks = hooks


class _Swap:
    """One armed (module, weight) pair: swaps W + ε in for the length of each call."""

    __slots__ = ("arming", "reader", "site")

    def __init__(self, arming: Arming, site: Site, reader: Reader):
        self.arming = arming
        self.site = site
        self.reader = reader

    def pre(self, module: nn.Module) -> Optional[_Entry]:
        arming = self.arming
        if arming.auto and not module.training:
            return None  # drop-in mode: evaluation sees W
        reader = self.reader
        weight = reader.read()
        if _zero.is_partitioned(weight):
            return _zero.swap_pre(self, weight)
        if not is_plain(weight):
            if is_dtensor(weight):
                raise RuntimeError(
                    f"Module {reader.name!r}: its weight is still a sharded DTensor inside its "
                    "forward (tensor parallelism?). flatopt perturbs whole rows of the weight "
                    "the forward reads: FSDP2 (fully_shard) is supported, tensor-parallel "
                    "sharding is not."
                )
            self.site._check_quantized(reader, weight)
            arming.calls += 1
            return _Entry(self, weight, None, None)  # output-side noise, added in post
        if _in_transform() is not None:
            return self._pre_transformed(weight)
        noise = arming.noise(self.site, weight)
        if weight.requires_grad and torch.is_grad_enabled():
            perturbed = _PerturbedWeight.apply(weight, noise)
        else:
            perturbed = noise.apply(weight)
        pack = _packer(noise, weight, perturbed, reader.name)
        _push_hooks(pack, _unpack)
        entry = _Entry(self, weight, perturbed, pack)
        try:
            _write(reader.owner, reader.attr, perturbed)
        except BaseException:
            _pop_hooks()
            raise
        arming.calls += 1
        return entry

    def _pre_transformed(self, weight: Tensor) -> _Entry:
        """Inside torch.func transforms (grad, jacrev, vmap, ...): the noise is drawn outside
        them (it depends on no input, and vmap's default randomness refuses draws), and no
        saved-tensor hooks are pushed (the transforms refuse them), so autograd keeps W + ε."""
        plain = _unwrap(weight)
        with torch._C._DisableFuncTorch():
            noise = self.arming.noise(self.site, plain, unwrap=True)
            if plain is weight:
                perturbed = noise.apply(plain)
            else:
                eps = noise.epsilon(plain, plain.dtype)
        if plain is not weight:  # W itself is a transform's input: keep W + ε differentiable
            perturbed = weight + eps
        _write(self.reader.owner, self.reader.attr, perturbed)
        self.arming.calls += 1
        return _Entry(self, weight, perturbed, None)

    def post(self, entry: _Entry, args: Any, kwargs: Any, output: Any) -> Any:
        if isinstance(entry, _zero.ZeroEntry):
            entry.post()
            return output
        if entry.perturbed is None:
            return self._output_noise(entry.weight, args, kwargs, output)
        if entry.hooks is not None:
            _pop_hooks()
        reader = self.reader
        # Write W back only if the module still holds our W + ε (FSDP may have resharded it).
        if _read(reader.owner, reader.attr) is entry.perturbed:
            _write(reader.owner, reader.attr, entry.weight)
        return output

    def unwind(self, entry: _Entry) -> None:
        """Undo a call whose forward hook did not run (an interrupted forward)."""
        if isinstance(entry, _zero.ZeroEntry):
            entry.unwind()
            return
        if entry.perturbed is None:
            return
        reader = self.reader
        if _read(reader.owner, reader.attr) is entry.perturbed:
            _write(reader.owner, reader.attr, entry.weight)
        # A forward re-run inside backward entered its hooks in autograd's own copy of the
        # thread state, which is gone by now: pop them only if they are still on top.
        top = _top_hooks(False) if entry.hooks is not None else None
        if top is not None and top[0] is entry.hooks:
            _pop_hooks()

    def _output_noise(self, weight: Tensor, args: Any, kwargs: Any, output: Any) -> Any:
        if output is None:
            return output
        x = args[0] if args else kwargs.get("input")
        if x is None:
            raise TypeError(
                f"Module {self.reader.name!r} was called without its input tensor as the first "
                "argument or input=...; flatopt's output-side noise for quantized weights needs "
                "the layer's input."
            )
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{type(self.reader.owner).__name__} returned {type(output).__name__}; "
                "flatopt's output-side noise for quantized weights needs a layer that returns "
                "one tensor."
            )
        dtype = output.dtype if output.is_floating_point() else torch.get_default_dtype()
        noise = self.arming.noise(self.site, weight)
        op = self.reader.op(weight)
        return output + OutputNoise.apply(x, lambda d: noise.epsilon(weight, d), op, dtype)


def _packer(noise: Noise, weight: Tensor, perturbed: Tensor, name: str) -> Callable:
    # Only plain facts about W + ε are captured: holding the tensor would keep it alive.
    ptr, device, dtype = perturbed.data_ptr(), perturbed.device, perturbed.dtype
    version = weight._version
    outer = _top_hooks(False)

    def pack(saved: Tensor) -> Any:
        if (
            saved.dtype == dtype
            and saved.device == device
            and saved.layout == torch.strided
            and not saved.is_nested
            and not _is_wrapped(saved)
            and saved.data_ptr() - saved.storage_offset() * saved.element_size() == ptr
        ):
            return _Token(
                noise,
                weight,
                version,
                saved.size(),
                saved.stride(),
                saved.storage_offset(),
                name,
            )
        if outer is not None:
            return _Outer(outer[1], outer[0](saved))
        return saved

    return pack


def _unpack(packed: Any) -> Tensor:
    if isinstance(packed, _Token):
        if packed.weight._version != packed.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: the weight of {packed.name!r}, from which flatopt "
                f"regenerates W + ε, is at version {packed.weight._version}; expected version "
                f"{packed.version} instead. Do not modify the weight between forward and "
                "backward."
            )
        if torch.is_grad_enabled():  # backward with create_graph=True
            with torch.no_grad():
                full = packed.noise.apply(packed.weight)
        else:
            full = packed.noise.apply(packed.weight)
        if packed.offset == 0 and packed.size == full.shape and packed.stride == full.stride():
            return full  # autograd saved W + ε itself: no view to rebuild
        return full.as_strided(packed.size, packed.stride, packed.offset)
    if isinstance(packed, _Outer):
        return packed.unpack(packed.packed)
    return packed


# -- one arming -----------------------------------------------------------------------------


class Arming:
    """The live perturbation of a set of sites; `disarm` removes every trace of it.

    Each site's std is computed at the first forward that reads it (from the tensor that
    forward reads: the whole, unsharded weight under FSDP) and kept in ``stds``, which the
    caller may share between armings (one std per optimizer step).
    """

    def __init__(
        self,
        sites: Sequence[Site],
        sigma: float,
        seed_of: Callable[[int], int],
        stds: dict[int, Tensor],
        generators: Generators,
        auto: bool = False,
    ):
        self.sigma = sigma
        self.auto = auto
        self.calls = 0  # target forwards that ran perturbed
        self._seed_of = seed_of
        self._stds = stds
        self._generators = generators
        self._noises: dict[int, Noise] = {}
        self._swaps: list[tuple[_Slot, str, _Swap]] = []
        try:
            for site in sites:
                for reader in site.readers:
                    slot, name = reader.slot, reader.target.param_name
                    if not slot.installed:
                        raise RuntimeError(
                            f"flatopt.remove_hooks() took the hooks off {reader.name!r}; build a "
                            "new FlatPerturb to perturb this model again."
                        )
                    if name in slot.swaps:
                        raise RuntimeError(
                            f"{site.name!r} is already perturbed by another FlatPerturb or "
                            "sharpness() call; restore that one first."
                        )
                    swap = slot.swaps[name] = _Swap(self, site, reader)
                    self._swaps.append((slot, name, swap))
        except BaseException:
            self.disarm()
            raise
        self.size = len(self._swaps)  # how many (module, weight) pairs were armed

    def noise(self, site: Site, weight: Tensor, unwrap: bool = False) -> Noise:
        noise = self._noises.get(site.index)
        if noise is None:
            std = self._stds.get(site.index)
            if std is None:
                std = self._stds[site.index] = site.std(self.sigma, weight, unwrap)
            generator = self._generators(weight.device)
            keep = site.readers[0].keep
            seed = self._seed_of(site.index)
            noise = Noise(std, seed, generator, weight, site.transposed, keep)
            self._noises[site.index] = noise
        return noise

    def disarm(self) -> None:
        swaps, self._swaps = self._swaps, []
        slots = []
        for slot, name, swap in swaps:
            if slot.swaps.get(name) is swap:
                del slot.swaps[name]
            if slot not in slots:
                slots.append(slot)
        for slot in slots:
            _unwind(slot)


# -- generators and the parallel draw -------------------------------------------------------


class _Parallel:
    """Runs the blocks of a CPU draw on torch's thread count, one generator per thread.

    torch's CPU generator draws one stream on one core; the blocks of a draw have their own
    seeds (`flatopt.noise.blocks`), so they can be drawn on several cores with the same bits.
    """

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._owner = (0, 0)  # (process id, worker count) the pool was made for
        self._local = threading.local()

    def _generator(self) -> torch.Generator:
        generator = getattr(self._local, "generator", None)
        if generator is None:
            generator = self._local.generator = torch.Generator()
        return generator

    def _run(self, fill: Callable[[int, torch.Generator], None], indices: range) -> None:
        generator = self._generator()
        for index in indices:
            fill(index, generator)

    def __call__(self, fill: Callable[[int, torch.Generator], None], count: int) -> None:
        workers = min(torch.get_num_threads(), count)
        share = -(-count // workers)
        ranges = [range(start, min(start + share, count)) for start in range(0, count, share)]
        if len(ranges) == 1:
            self._run(fill, ranges[0])
            return
        pool, owner = self._pool, (os.getpid(), torch.get_num_threads() - 1)
        if pool is None or self._owner != owner:  # first use, after a fork, or new thread count
            if pool is not None and self._owner[0] == owner[0]:
                pool.shutdown(wait=False)
            pool = self._pool = ThreadPoolExecutor(owner[1], thread_name_prefix="flatopt")
            self._owner = owner
        futures = [pool.submit(self._run, fill, indices) for indices in ranges[1:]]
        self._run(fill, ranges[0])
        for future in futures:
            future.result()


_parallel = _Parallel()


class Generators:
    """One private ``torch.Generator`` per device, created on first use."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator:
        generator = self._by_device.get(device)
        if generator is None:
            generator = self._by_device[device] = torch.Generator(device=device)
        return generator
