"""One armed weight: how a module's forward sees W + P while W itself is never written.

For the length of each call the pre-hook writes a fresh W + P into the module and the forward
hook writes W back. Whatever autograd saves of W + P is packed into a small `_Token` and
regenerated bit for bit when backward needs it, so no perturbed weight lives from the forward
to the backward. Quantized weights get P on the output side instead, and torch.func transforms
get W + P without saved-tensor hooks (they refuse them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor, nn

from . import _sites, _zero
from ._output import is_dtensor, is_plain

if TYPE_CHECKING:
    from ._arming import Arming
    from ._sites import Reader, Site

__all__ = ["Dense", "Law", "Perturbation"]

_C = torch._C._autograd
_push_hooks = _C._push_saved_tensors_default_hooks
_pop_hooks = _C._pop_saved_tensors_default_hooks
_top_hooks = _C._top_saved_tensors_default_hooks  # torch >= 2.8, hence flatopt's bound
_functorch = torch._C._functorch
_is_wrapped = _functorch.is_functorch_wrapped_tensor
_in_transform = _functorch.peek_interpreter_stack


class _Token(NamedTuple):
    """What autograd keeps of W + P: enough to regenerate it, and the view's geometry."""

    perturbation: Perturbation
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


class Perturbation(Protocol):
    """One weight's P for one arming: what the forward adds to W, in W's storage layout.

    Flat-LoRA's seeded noise (`flatopt._flat.Noise`), Bi-LoRA's auxiliary low-rank module
    (`flatopt.bilora.Auxiliary`) and a stored gradient-derived P (`Dense`) implement it. The
    hooks, tokens, exactness and auto mode around it are the same for each.
    """

    output_side: bool  # P is added to the layer's output (`output`), W + P never built

    def apply(self, weight: Tensor) -> Tensor:
        """W + P as a new tensor, outside autograd. Called again, bit for bit the same, when
        backward unpacks a saved W + P (so P's inputs must not change in between)."""

    def forward(self, weight: Tensor) -> Tensor:
        """W + P for the forward: differentiable for W when W requires grad (the gradient is
        the one taken at W + P), and for whatever P is made of (a low-rank P's factors)."""

    def output(self, weight: Tensor, op: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        """f(x; P), the part of the output P adds, for a quantized W that cannot be added to
        (``op`` is the layer as a function of its weight, `flatopt._output.layer_op`), and for
        a P whose ``output_side`` attribute is true (a low-rank P on a plain linear layer).
        A floating ``x`` arrives in ``dtype``, the layer's output dtype."""

    def transformed(self, weight: Tensor, plain: Tensor) -> Tensor:
        """W + P inside a torch.func transform: no saved-tensor hooks (the transforms refuse
        them); ``plain`` is the tensor inside ``weight``'s wrappers."""


class Law(Protocol):
    """What an `flatopt._arming.Arming` asks for each site's P, once per arming."""

    train_only: bool  # eval-mode forwards see W even while armed explicitly

    def perturbation(self, site: Site, weight: Tensor, unwrap: bool = False) -> Perturbation:
        """P for ``site``, given the tensor the forward reads (the whole weight under FSDP2);
        ``unwrap``: inside torch.func, read the plain tensors in their wrappers."""


class Dense:
    """A stored P (a gradient-derived perturbation, SAM-style), in W's storage layout.

    P is a constant: the gradient reaches W, if W requires grad, and nothing else.
    """

    __slots__ = ("tensor",)
    output_side = False

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def apply(self, weight: Tensor) -> Tensor:
        return weight.detach() + self.tensor.to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        with torch.no_grad():
            p = self.tensor.to(weight.dtype)
        return weight + p

    def output(self, weight: Tensor, op: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
        return op.forward(x, self.tensor.to(dtype))

    def transformed(self, weight: Tensor, plain: Tensor) -> Tensor:
        return weight + self.tensor.to(weight.dtype)


class _Entry:
    """One call in flight of one armed weight: what to put back after it."""

    __slots__ = ("hooks", "perturbed", "swap", "weight")

    def __init__(self, swap: _Swap, weight: Tensor, perturbed: Optional[Tensor], hooks: Any):
        self.swap = swap
        self.weight = weight
        self.perturbed = perturbed
        self.hooks = hooks

    def holds_perturbed(self) -> bool:
        """The module still reads this call's W + P."""
        return self.swap.reader.read() is self.perturbed


class _Swap:
    """One armed (module, weight) pair: swaps W + P in for the length of each call."""

    __slots__ = ("arming", "reader", "site")

    def __init__(self, arming: Arming, site: Site, reader: Reader):
        self.arming = arming
        self.site = site
        self.reader = reader

    def pre(self, module: nn.Module) -> Optional[_Entry]:
        arming = self.arming
        if not module.training and (arming.auto or arming.law.train_only):
            return None  # drop-in mode (or a training-only P): evaluation sees W
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
        perturbation = arming.perturbation(self.site, weight)
        if perturbation.output_side:  # P added to the output, in post
            arming.calls += 1
            return _Entry(self, weight, None, None)
        perturbed = perturbation.forward(weight)
        pack = _packer(perturbation, weight, perturbed, reader.name)
        _push_hooks(pack, _unpack)
        entry = _Entry(self, weight, perturbed, pack)
        try:
            _sites._write(reader.owner, reader.attr, perturbed)
        except BaseException:
            _pop_hooks()
            raise
        arming.calls += 1
        return entry

    def _pre_transformed(self, weight: Tensor) -> _Entry:
        """Inside torch.func transforms (grad, jacrev, vmap, ...): P is made outside them (it
        depends on no input, and vmap's default randomness refuses draws), and no saved-tensor
        hooks are pushed (the transforms refuse them), so autograd keeps W + P."""
        plain = _sites._unwrap(weight)
        with torch._C._DisableFuncTorch():
            perturbation = self.arming.perturbation(self.site, plain, unwrap=True)
        perturbed = perturbation.transformed(weight, plain)
        _sites._write(self.reader.owner, self.reader.attr, perturbed)
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
        # Write W back only if the module still holds our W + P (FSDP may have resharded it).
        if _sites._read(reader.owner, reader.attr) is entry.perturbed:
            _sites._write(reader.owner, reader.attr, entry.weight)
        return output

    def unwind(self, entry: _Entry) -> None:
        """Undo a call whose forward hook did not run (an interrupted forward)."""
        if isinstance(entry, _zero.ZeroEntry):
            entry.unwind()
            return
        if entry.perturbed is None:
            return
        reader = self.reader
        if _sites._read(reader.owner, reader.attr) is entry.perturbed:
            _sites._write(reader.owner, reader.attr, entry.weight)
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
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)  # as the layer computes (fp32 into bf16); autograd casts x's grad back
        perturbation = self.arming.perturbation(self.site, weight)
        return output + perturbation.output(weight, self.reader.op(weight), x, dtype)


def _packer(perturbation: Perturbation, weight: Tensor, perturbed: Tensor, name: str) -> Callable:
    # Only plain facts about W + P are captured: holding the tensor would keep it alive.
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
                perturbation,
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
                f"regenerates W + P, is at version {packed.weight._version}; expected version "
                f"{packed.version} instead. Do not modify the weight between forward and "
                "backward."
            )
        if torch.is_grad_enabled():  # backward with create_graph=True
            with torch.no_grad():
                full = packed.perturbation.apply(packed.weight)
        else:
            full = packed.perturbation.apply(packed.weight)
        if packed.offset == 0 and packed.size == full.shape and packed.stride == full.stride():
            return full  # autograd saved W + P itself: no view to rebuild
        return full.as_strided(packed.size, packed.stride, packed.offset)
    if isinstance(packed, _Outer):
        return packed.unpack(packed.packed)
    return packed
