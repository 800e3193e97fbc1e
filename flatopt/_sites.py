"""Sites: the weights flatopt perturbs, and the modules that read them.

An adapter's `flatopt.Target` names a module and the parameter its forward reads. A `Site` is
one distinct weight (several `Reader` modules for a tied weight, all seeing one perturbation),
with its index (which seeds its noise), its logical ``(rows, fan_in)`` shape and the path from
the scanned model to its owner, so that a module replaced after the scan is noticed. Nothing
here arms or draws anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _zero
from ._hooks import _slot
from ._output import dequantized, is_dtensor, is_plain, layer_op
from .adapters import Target
from .noise import row_dim

__all__ = ["Reader", "Site", "build_sites"]

_functorch = torch._C._functorch
_is_wrapped = _functorch.is_functorch_wrapped_tensor


def _unwrap(tensor: Any) -> Any:
    """The plain tensor inside torch.func's wrappers (a law treats it as a constant)."""
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
