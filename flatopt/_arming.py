"""How a layer's forward sees W + ε while W itself is never written.

While armed, a forward pre-hook swaps the tensor the module reads for a fresh W + ε, and the
forward hook swaps W back. Whatever autograd saves of W + ε is packed into a small token and
regenerated bit for bit from the seed when backward needs it, so no perturbed weight lives
from the forward to the backward.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ._output import OutputSwap, dequantized, is_plain, layer_op
from .adapters import Target
from .noise import base_row_sq, draw_noise, noise_std, perturbed_weight, row_dim

__all__ = ["Armed", "Generators", "Site", "build_sites"]

_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _read(target: Target) -> Tensor:
    module, name = target.owner()
    for store in (module._parameters, module._buffers):
        if name in store:
            return store[name]
    return module.__dict__[name]


def _write(target: Target, value: Tensor) -> None:
    module, name = target.owner()
    for store in (module._parameters, module._buffers):
        if name in store:
            store[name] = value
            return
    module.__dict__[name] = value


class Site:
    """One perturbed weight: its name, index, layout, the targets that read it (several for
    tied weights, all seeing the same ε) and a cache of its base row norms."""

    def __init__(self, index: int, name: str, targets: Sequence[Target]):
        self.index = index
        self.name = name
        self.target = targets[0]
        self.readers = tuple(targets)
        for target in self.readers:
            _slot(target.module)
        weight = self.target.weight
        rows = weight.shape[row_dim(weight, self.target.transposed)]
        self.logical_shape = (rows, weight.numel() // max(rows, 1))
        self._base_key: Optional[tuple[int, int]] = None
        self._base_sq: Optional[Tensor] = None
        # A weight that cannot be added to (quantized) gets its noise on the output side.
        self.ops = (
            None
            if is_plain(weight)
            else [layer_op(t.owner()[0], weight, t.transposed) for t in targets]
        )
        if self.ops is not None and (None in self.ops or dequantized(weight) is None):
            module = self.readers[self.ops.index(None) if None in self.ops else 0].module
            raise ValueError(
                f"Module {name!r}: {type(module).__name__}.{self.target.param_name} is a "
                f"{type(weight).__name__} of dtype {weight.dtype}. flatopt adds ε to plain "
                "floating weights, and applies it on the output side for quantized weights of "
                "linear, conv and embedding layers that can be dequantized (.dequantize()); "
                "this one is neither. Exclude the layer, or dequantize its base weight."
            )

    def std(self, sigma: float) -> Tensor:
        """The per-row noise std σ·‖W'_i‖/√n at the weights' current values."""
        target, stored = self.target, self.target.weight
        with torch.no_grad():
            delta = target.delta() if target.delta is not None else None
            weight = stored if self.ops is None else dequantized(stored)
        base_sq = None
        if not isinstance(delta, Tensor):
            # ‖W_i‖² is reused while W is unchanged: frozen base weights never pay it twice.
            key = (stored._version, id(stored))
            if key != self._base_key:
                self._base_sq, self._base_key = base_row_sq(weight, target.transposed), key
            base_sq = self._base_sq
        return noise_std(weight, delta, sigma, transposed=target.transposed, base_sq=base_sq)


def build_sites(found: Sequence[tuple[str, Target]]) -> list[Site]:
    """Group the adapters' targets by the weight they read: one site per distinct weight."""
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
                    "disagree on transposed=; a tied weight needs one layout for its rows."
                )
        readers: dict[tuple[int, str], Target] = {}  # two claims on one module count once
        for _, target in group:
            readers.setdefault((id(target.module), target.param_name), target)
        sites.append(Site(index, name, list(readers.values())))
    return sites


class _Token(NamedTuple):
    """What autograd keeps of W + ε: enough to regenerate it, and the view's geometry."""

    noise: _Noise
    weight: Tensor
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Outer(NamedTuple):
    """A saved tensor handed to the saved-tensor hooks that were active around ours."""

    unpack: Callable[[Any], Tensor]
    packed: Any


class _Noise:
    """One weight's noise for one arming: its std, seed, generator and layout."""

    def __init__(self, std: Tensor, seed: int, generator: torch.Generator, transposed: bool):
        self.std = std
        self.seed = seed
        self.generator = generator
        self.transposed = transposed

    def epsilon(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """ε itself, drawn in ``dtype``: for quantized weights, which have no float dtype."""
        eps = draw_noise(
            weight,
            self.std,
            transposed=self.transposed,
            generator=self.generator,
            seed=self.seed,
            dtype=dtype,
        )
        return eps.to(dtype)

    def apply(self, weight: Tensor) -> Tensor:
        return perturbed_weight(
            weight,
            self.std,
            transposed=self.transposed,
            generator=self.generator,
            seed=self.seed,
            run=_parallel,
        )


class _PerturbedWeight(torch.autograd.Function):
    """W + ε for a trainable W: the gradient reaching W is the one taken at W + ε."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, noise: _Noise) -> Tensor:
        return noise.apply(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Swap:
    """One armed target: swaps W + ε in for the length of each call of its module."""

    def __init__(self, target: Target, noise: _Noise):
        self.target = target
        self.noise = noise
        self.calls = 0
        self.stack: list[tuple[Tensor, Any]] = []

    def pre(self, module: nn.Module, args: Any) -> None:
        weight = _read(self.target)
        if weight.requires_grad and torch.is_grad_enabled():
            perturbed = _PerturbedWeight.apply(weight, self.noise)
        else:
            perturbed = self.noise.apply(weight)
        hooks = torch.autograd.graph.saved_tensors_hooks(self._packer(weight, perturbed), _unpack)
        _write(self.target, perturbed)
        hooks.__enter__()
        self.stack.append((weight, hooks))
        self.calls += 1

    def post(self, module: nn.Module, args: Any, output: Any) -> Any:
        weight, hooks = self.stack.pop()
        hooks.__exit__(None, None, None)
        _write(self.target, weight)
        return output

    def unwind(self) -> None:
        """Undo swaps that a failed forward left behind (its forward hook did not run)."""
        while self.stack:
            weight, hooks = self.stack.pop()
            _write(self.target, weight)
            # A forward re-run inside backward entered its hooks in autograd's own copy of the
            # thread state, which is gone by now: pop them only if they are still on top.
            top = _top_saved_tensors_hooks(False) if _top_saved_tensors_hooks else None
            if top is not None and top[0] is hooks.pack_hook:
                hooks.__exit__(None, None, None)

    def _packer(self, weight: Tensor, perturbed: Tensor) -> Callable[[Tensor], Any]:
        # Only plain facts about W + ε are captured: holding the tensor would keep it alive.
        noise, ptr = self.noise, perturbed.untyped_storage().data_ptr()
        device, dtype = perturbed.device, perturbed.dtype
        outer = _top_saved_tensors_hooks(False) if _top_saved_tensors_hooks else None

        def pack(saved: Tensor) -> Any:
            if (
                saved.device == device
                and saved.dtype == dtype
                and saved.untyped_storage().data_ptr() == ptr
            ):
                return _Token(noise, weight, saved.size(), saved.stride(), saved.storage_offset())
            if outer is not None:
                return _Outer(outer[1], outer[0](saved))
            return saved

        return pack


def _unpack(packed: Any) -> Tensor:
    if isinstance(packed, _Token):
        with torch.no_grad():
            full = packed.noise.apply(packed.weight)
        return full.as_strided(packed.size, packed.stride, packed.offset)
    if isinstance(packed, _Outer):
        return packed.unpack(packed.packed)
    return packed


def _not_compiled(fn: Callable[..., None]) -> Callable[..., None]:
    # torch.compile must run these hooks eagerly: they draw noise and enter saved-tensor hooks.
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class _Slot:
    """flatopt's two forward hooks on one module. They are installed once, when a target is
    first found, so that a ``torch.compile``'d model sees them; they do nothing unless armed."""

    def __init__(self) -> None:
        self.swaps: dict[str, Union[_Swap, OutputSwap]] = {}
        self.pre = _not_compiled(self._pre)
        self.post = _not_compiled(self._post)

    def _pre(self, module: nn.Module, args: Any) -> None:
        for swap in self.swaps.values():
            swap.pre(module, args)

    def _post(self, module: nn.Module, args: Any, output: Any) -> Any:
        for swap in reversed(list(self.swaps.values())):
            output = swap.post(module, args, output)
        return output


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slot] = weakref.WeakKeyDictionary()


def _slot(module: nn.Module) -> _Slot:
    slot = _SLOTS.get(module)
    if slot is None:
        slot = _SLOTS[module] = _Slot()
        module.register_forward_pre_hook(slot.pre)
        module.register_forward_hook(slot.post, always_call=True)
    return slot


class Armed:
    """The live perturbation of a set of sites; `disarm` removes every trace of it."""

    def __init__(
        self,
        sites: Sequence[Site],
        stds: Sequence[Tensor],
        seeds: Sequence[int],
        generator: Callable[[torch.device], torch.Generator],
    ):
        self._swaps: list[tuple[_Slot, str, Union[_Swap, OutputSwap]]] = []
        try:
            for site, std, seed in zip(sites, stds, seeds):
                weight = site.target.weight
                noise = _Noise(std, seed, generator(weight.device), site.target.transposed)
                for reader, target in enumerate(site.readers):
                    slot, name = _slot(target.module), target.param_name
                    if name in slot.swaps:
                        raise RuntimeError(
                            f"{site.name!r} is already perturbed by another FlatPerturb or "
                            "sharpness() call; restore that one first."
                        )
                    if site.ops is None:
                        swap = slot.swaps[name] = _Swap(target, noise)
                    else:
                        epsilon = functools.partial(noise.epsilon, weight)
                        swap = slot.swaps[name] = OutputSwap(target, epsilon, site.ops[reader])
                    self._swaps.append((slot, name, swap))
        except BaseException:
            self.disarm()
            raise
        self.size = len(self._swaps)  # how many (module, weight) pairs were armed

    @property
    def calls(self) -> int:
        """How many target forwards ran under this arming."""
        return sum(swap.calls for _, _, swap in self._swaps)

    def disarm(self) -> None:
        swaps, self._swaps = self._swaps, []
        for slot, name, swap in swaps:
            if slot.swaps.get(name) is swap:
                del slot.swaps[name]
        for _, _, swap in swaps:
            swap.unwind()


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
