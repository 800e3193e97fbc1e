"""The adapter protocol: how flatopt finds the weights to perturb in any LoRA implementation.

An adapter is any callable ``adapter(module) -> Target | None``. It is asked about every
module of the model; the first adapter that returns a `Target` claims that module.
Adapters recognise classes by duck typing, so no LoRA library is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .noise import Delta

__all__ = [
    "Adapter",
    "Target",
    "check_adapters",
    "dense",
    "find_targets",
    "register_adapter",
    "unregister_adapter",
]


@dataclass(frozen=True)
class Target:
    """One weight to perturb: what the forward reads, and the low-rank update merged into it.

    Args:
        module: the module whose forward reads the weight. Its forward hooks must run, i.e. it
            is called as ``module(...)``.
        param_name: the attribute the forward reads, ``getattr(module, param_name)``; a dotted
            name such as ``"conv.weight"`` names a child's tensor that ``module``'s forward
            reads without calling the child.
        delta: a zero-argument callable returning ΔW: a tensor in the weight's storage layout,
            a `LowRank` (or a list of them, one per active adapter), or None.
            ``None`` instead of a callable means ΔW = 0.
        transposed: the weight is stored as ``(fan_in, out)``, e.g. GPT-2's ``Conv1D``.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> Target(layer, "weight").param_name
        'weight'
    """

    module: nn.Module
    param_name: str
    delta: Optional[Callable[[], Delta]] = None
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """The tensor the forward reads (the frozen base weight for LoRA layers)."""
        owner, name = self.owner()
        return getattr(owner, name, None)

    def owner(self) -> tuple[nn.Module, str]:
        """The module that stores the tensor, and its name there (``"conv.weight"`` is the
        ``weight`` of ``module.conv``: for a layer that reads a child's weight itself)."""
        path, _, name = self.param_name.rpartition(".")
        return (self.module.get_submodule(path) if path else self.module), name


Adapter = Callable[[nn.Module], Optional[Target]]

_REGISTERED: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add an adapter for every future `FlatPerturb`, tried before the built-ins.

    Returns the adapter, so it can be used as a decorator.

    Raises:
        TypeError: ``adapter`` is not callable.

    Example:
        >>> @register_adapter
        ... def my_lora(module):
        ...     return None  # return a Target for your LoRA class
        >>> unregister_adapter(my_lora)
    """
    if not callable(adapter):
        raise TypeError(
            f"register_adapter expects a callable module -> Target | None, got {adapter!r}."
        )
    if adapter not in _REGISTERED:
        _REGISTERED.append(adapter)
    return adapter


def unregister_adapter(adapter: Adapter) -> None:
    """Remove an adapter added by `register_adapter`; unknown adapters are ignored.

    Example:
        >>> unregister_adapter(print)
    """
    if adapter in _REGISTERED:
        _REGISTERED.remove(adapter)


def flatopt_lora(module: nn.Module) -> Optional[Target]:
    """Built-in adapter for `flatopt.lora.LoRALinear`."""
    from .lora import LoRALinear

    if isinstance(module, LoRALinear):
        return Target(module.base, "weight", module.low_rank)
    return None


def _builtins() -> tuple[Adapter, ...]:
    """flatopt's own LoRA, then peft, loralib, minLoRA, torchtune and litgpt's (integrations)."""
    from .integrations import ADAPTERS  # imported here: integrations imports this module

    return (flatopt_lora, *ADAPTERS)


def _stored_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight with the output features on dim 1."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return True  # (num_embeddings, dim): read as the linear map from a one-hot token
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return True  # (in, out / groups, *kernel)
    # transformers' Conv1D (GPT-2): weight (in, out), recognised without importing it
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _Dense:
    """The adapter `dense` returns: claims the given modules' ``param_name`` with ΔW = 0.

    A small class rather than a closure, so that a FlatPerturb using it pickles and copies.
    """

    def __init__(self, modules: tuple[nn.Module, ...], param_name: str, transposed: Any):
        self.modules = modules
        self.param_name = param_name
        self.transposed = transposed
        self.__name__ = f"dense({', '.join(type(m).__name__ for m in modules)})"

    def __call__(self, module: nn.Module) -> Optional[Target]:
        if not any(module is chosen for chosen in self.modules):
            return None
        transposed = self.transposed
        if transposed is None:
            transposed = _stored_transposed(module)
        return Target(module, self.param_name, None, transposed=transposed)

    def __repr__(self) -> str:
        return self.__name__


def dense(
    *modules: nn.Module, param_name: str = "weight", transposed: Optional[bool] = None
) -> Adapter:
    """Perturb full-rank modules too (a new head, an embedding), with ΔW = 0.

    Flat-LoRA as published perturbs only the LoRA layers; a freshly trained full-rank layer
    next to them then trains without weight noise. Passing ``adapters=[flatopt.dense(head)]``
    makes its forward see W + ε with ε_ij = σ_t·‖W_i‖/√fan_in·z_ij. When W is trainable, the
    gradient reaching it is the one at W + ε, as the objective E[L(W + ε)] asks; flatopt still
    never writes W.

    Rows are output features, whatever the storage layout: an ``nn.Linear`` or conv weight's
    first dim; an ``nn.ConvTranspose*d`` weight's second (``(in, out, *kernel)``); the second
    dim of a transformers ``Conv1D`` (``(in, out)``); and for ``nn.Embedding`` and
    ``nn.EmbeddingBag`` (``(num_embeddings, dim)``, read as the linear map from a one-hot
    token) the embedding dims, so fan_in is ``num_embeddings``. An embedding's
    ``padding_idx`` entry is a fixed pad, and stays unperturbed.

    Args:
        *modules: the modules whose weight to perturb.
        param_name: the attribute their forward reads.
        transposed: the weight is stored ``(fan_in, out)``; None recognises the layouts above
            (a 2-D user layout stored that way passes True).

    Returns:
        An adapter for ``FlatPerturb(adapters=[...])`` or `sharpness(adapters=[...])`.

    Raises:
        TypeError: an argument is not an ``nn.Module``, or its weight was flattened by FSDP1
            (use FSDP2's ``fully_shard``).
        ValueError: no module given, a module's weight has fewer than 2 dims (biases and
            norm layers are never perturbed), or a grouped transposed convolution (its output
            channels are not one storage dim).

    Example:
        >>> from flatopt import FlatPerturb
        >>> from flatopt.lora import add_lora
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> net = add_lora(net, ["0"])
        >>> net[1].requires_grad_(True)  # a new, fully trained head
        Linear(in_features=8, out_features=2, bias=True)
        >>> inner = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        >>> opt = FlatPerturb(inner, net, total_steps=10, adapters=[dense(net[1])])
        >>> opt.targets
        [('0', (8, 8)), ('1', (2, 8))]
    """
    if not modules:
        raise ValueError("dense() needs at least one module, e.g. flatopt.dense(model.head).")
    if transposed is not None and not isinstance(transposed, bool):
        raise TypeError(f"dense(transposed=...) takes True, False or None, got {transposed!r}.")
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"dense() takes nn.Module arguments, got {type(module).__name__}.")
        weight = getattr(module, param_name, None)
        layer = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)
        ndim = len(getattr(weight, "ds_shape", getattr(weight, "shape", ())))  # ZeRO-3: ds_shape
        if isinstance(weight, torch.Tensor) and ndim < 2 and isinstance(module, layer):
            raise TypeError(_FSDP1)  # a layer whose weight is flat: FSDP1 flattened it
        if isinstance(weight, torch.Tensor) and ndim < 2:
            raise ValueError(
                f"dense({type(module).__name__}): its {param_name!r} has shape "
                f"{tuple(weight.shape)}; biases and norm layers are never perturbed. Pass "
                "linear, conv or embedding modules."
            )
        if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1:
            raise ValueError(
                f"dense({type(module).__name__}) with groups={module.groups}: a grouped "
                "transposed convolution's output channels are spread over two storage dims, "
                "so its rows cannot be read off one dim. Pass adapters=[fn] returning your "
                "own flatopt.Target, or leave the layer out."
            )
    return _Dense(tuple(modules), param_name, transposed)


def _named_modules(model: nn.Module | Iterable[nn.Module]) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Module):
        return list(model.named_modules())
    named = []
    for index, module in enumerate(model):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"model must be an nn.Module or an iterable of nn.Module, but item {index} is "
                f"{type(module).__name__}."
            )
        named += [
            (f"{index}.{name}" if name else str(index), m) for name, m in module.named_modules()
        ]
    return named


_FSDP1 = (
    "The model is wrapped in FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel), which "
    "flattens its weights outside the forward. flatopt supports FSDP2: shard with "
    "torch.distributed.fsdp.fully_shard instead (each rank then sees exactly the noise "
    "unsharded flatopt gives)."
)


def check_adapters(adapters: Any) -> tuple[Adapter, ...]:
    """``adapters`` as a tuple of callables: one callable, or an iterable of them.

    Raises:
        TypeError: a string (adapters are callables, not names), something neither callable
            nor iterable, or an item that is not callable.

    Example:
        >>> check_adapters(print) == (print,)
        True
    """
    if isinstance(adapters, (str, bytes)):
        raise TypeError(
            f"Invalid adapters: {adapters!r}. adapters takes callables module -> "
            "flatopt.Target | None, not names; the built-in adapters (flatopt.lora, peft, "
            "loralib, minLoRA, torchtune, litgpt) are always tried, so leave adapters out for "
            "those, or pass adapters=[my_adapter] for your own LoRA class."
        )
    if callable(adapters) and not isinstance(adapters, Iterable):
        return (adapters,)  # one adapter, not in a list
    if not isinstance(adapters, Iterable):
        raise TypeError(
            f"Invalid adapters: {adapters!r}. Pass a callable module -> flatopt.Target | None, "
            "or a list of them: adapters=[my_adapter]."
        )
    adapters = tuple(adapters)
    for adapter in adapters:
        if not callable(adapter):
            raise TypeError(
                f"Invalid adapter: {adapter!r}. adapters must be callables "
                "module -> flatopt.Target | None."
            )
    return adapters


def _where(name: str, module: nn.Module) -> str:
    """A module by its qualified name, for messages (the root's name is ``''``)."""
    if name == "":
        return f"the model itself ({type(module).__name__})"
    return f"module {name!r} ({type(module).__name__})"


def _missing(target: Target) -> str:
    """Why ``target.param_name`` names no tensor: the first attribute missing on the way."""
    current: Any = target.module
    parts = target.param_name.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        label = type(current).__name__ + (f" {here!r}" if here else "")
        store = current._modules if isinstance(current, nn.Module) else {}
        found = store[part] if part in store else getattr(current, part, _ABSENT)
        if found is _ABSENT or found is None:
            return f"{label} has no attribute {part!r}, so it is not a tensor"
        current = found
    return f"that attribute is {type(current).__name__}, not a tensor"


_ABSENT = object()


def _check(target: object, adapter: Adapter, name: str, module: nn.Module) -> Target:
    if not isinstance(target, Target):
        raise TypeError(
            f"Adapter {getattr(adapter, '__name__', adapter)!r} returned "
            f"{type(target).__name__} for {_where(name, module)}; an adapter must return "
            "flatopt.Target(...) or None."
        )
    try:
        weight = target.weight
    except AttributeError:  # a dotted param_name through a missing child
        weight = None
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"Adapter {getattr(adapter, '__name__', adapter)!r}, asked about "
            f"{_where(name, module)}, targets {type(target.module).__name__}."
            f"{target.param_name}, but {_missing(target)}. Check param_name: "
            "it names the stored tensor the forward reads, on Target.module (dotted for a "
            "child's, e.g. 'conv.weight')."
        )
    layer = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)
    if len(getattr(weight, "ds_shape", weight.shape)) < 2:  # a ZeRO-3 partition: its ds_shape
        if isinstance(target.owner()[0], layer):
            raise TypeError(_FSDP1)  # a layer whose weight is flat: FSDP1 flattened it
        raise ValueError(
            f"Adapter {getattr(adapter, '__name__', adapter)!r} targets "
            f"{type(target.module).__name__}.{target.param_name} for module {name!r}, a tensor "
            f"of shape {tuple(weight.shape)}; flatopt perturbs weights of 2 or more dims "
            "(biases and norm layers are never perturbed)."
        )
    owner, attribute = target.owner()
    stored = (owner._parameters, owner._buffers, owner.__dict__)
    if not any(attribute in store for store in stored):
        raise ValueError(
            f"Module {name!r}: {type(target.module).__name__}.{target.param_name} is computed "
            "(a property or parametrization), not stored on the module. Point param_name at the "
            "stored tensor the forward reads, on the module that reads it."
        )
    return target


def find_targets(
    model: nn.Module | Iterable[nn.Module], adapters: Iterable[Adapter] = ()
) -> list[tuple[str, Target]]:
    """Ask every module of ``model`` the adapters in turn; return ``(name, Target)`` pairs.

    ``adapters`` are tried first, then the registered ones, then the built-ins. A weight that
    several modules read (tied weights) appears once per module; FlatPerturb gives it one ε.

    Raises:
        ValueError: no adapter recognised any module (the message lists the types seen).
        TypeError: an adapter returned something other than a Target or None, or the model
            is wrapped in FSDP1 (use FSDP2's ``fully_shard``).

    Example:
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], rank=2)
        >>> [(name, tuple(t.weight.shape)) for name, t in find_targets(net)]
        [('0', (4, 4))]
    """
    chain = [*check_adapters(adapters), *_REGISTERED, *_builtins()]
    named = _named_modules(model)
    if any(type(m).__name__ == "FullyShardedDataParallel" for _, m in named):
        raise TypeError(_FSDP1)
    found: list[tuple[str, Target]] = []
    for name, module in named:
        for adapter in chain:
            target = adapter(module)
            if target is not None:
                found.append((name, _check(target, adapter, name, module)))
                break
    if not found:
        types = sorted({type(m).__name__ for _, m in named})
        raise ValueError(
            f"No adapter recognised a LoRA layer in the model; module types seen: {types}. "
            "Add LoRA first (e.g. flatopt.lora.add_lora), or pass adapters=[...] / "
            "flatopt.register_adapter(...) for your LoRA class."
        )
    return found
