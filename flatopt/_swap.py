"""One armed weight: how a module's forward sees W + P while W itself is never written.

For the length of each call the pre-hook writes a fresh W + P into the module and the forward
hook writes W back. Whatever autograd saves of W + P is packed into a small `_Token` and
regenerated bit for bit when backward needs it, so no perturbed weight lives from the forward
to the backward. Quantized weights get P on the output side instead, and torch.func transforms
get W + P without saved-tensor hooks (they refuse them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import _zero
from ._generators import _parallel
from ._output import OutputNoise, is_dtensor, is_plain
from ._sites import Reader, Site, _read, _unwrap, _write
from .noise import _broadcast, _perturbed_weight, draw_noise

if TYPE_CHECKING:
    from ._arming import Arming

__all__ = ["Noise"]

_C = torch._C._autograd
_push_hooks = _C._push_saved_tensors_default_hooks
_pop_hooks = _C._pop_saved_tensors_default_hooks
_top_hooks = _C._top_saved_tensors_default_hooks  # torch >= 2.8, hence flatopt's bound
_functorch = torch._C._functorch
_is_wrapped = _functorch.is_functorch_wrapped_tensor
_in_transform = _functorch.peek_interpreter_stack


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

    def holds_perturbed(self) -> bool:
        """The module still reads this call's W + P."""
        return self.swap.reader.read() is self.perturbed


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
