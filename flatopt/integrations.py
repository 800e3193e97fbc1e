"""Built-in adapters for the LoRA libraries people use: peft, loralib, minLoRA-style
``torch.nn.utils.parametrize`` LoRA, torchtune and litgpt; and `trainer_optimizer`, which lets
a ``transformers.Trainer`` build its own optimizer wrapped in a `FlatPerturb`.

Each adapter recognises its layers by their attributes, never by importing the library, so
``import flatopt`` imports none of them and vendored copies (loralib and minLoRA are often
copied into projects) are recognised too. Each returns a `Target` on the module whose forward
reads the frozen weight, and a ``delta`` that hands ΔW over as `LowRank` factors, read at
every `FlatPerturb.perturb` from the layer's current state (merged, disabled, active adapters).
The semantics chosen for each library (merged, several adapters, DoRA, embeddings, conv) are
tabled on the docs' "Adapters" page. `FlatPerturb` tries them after any adapter of yours.

Example:
    >>> import torch
    >>> from flatopt.integrations import ADAPTERS
    >>> ", ".join(adapter.__name__ for adapter in ADAPTERS)
    'peft_lora, loralib_lora, parametrized_lora, torchtune_lora, litgpt_lora'
    >>> any(adapter(torch.nn.Linear(2, 2)) for adapter in ADAPTERS)  # not LoRA: no target
    False
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .adapters import Adapter, Target, find_targets
from .noise import LowRank, Schedule

__all__ = [
    "ADAPTERS",
    "litgpt_lora",
    "loralib_lora",
    "parametrized_lora",
    "peft_lora",
    "torchtune_lora",
    "trainer_optimizer",
]


def _has(module: object, *names: str) -> bool:
    return all(hasattr(module, name) for name in names)


def _block_rows(B: Tensor, rank: int, blocks: Sequence[tuple[int, int]], rows: int) -> Tensor:
    """B of a grouped LoRA (one rank-r block per enabled group) as a dense ``(rows, r·k)`` B.

    Group j's rows ``[start, start + size)`` get B's j-th row block in columns ``[j·r, (j+1)·r)``
    and every other entry is 0, so ``B_full @ A`` is the zero-padded, block-structured ΔW.
    """
    full = B.new_zeros(rows, rank * len(blocks))
    offset = 0
    for j, (start, size) in enumerate(blocks):
        full[start : start + size, j * rank : (j + 1) * rank] = B[offset : offset + size]
        offset += size
    return full


def _low_rank(module: nn.Module, blocks: Optional[list[tuple[int, int]]], rows: int) -> LowRank:
    """loralib's and litgpt's ``lora_B``, ``lora_A``, ``scaling``, read now; grouped if blocks."""
    B = module.lora_B if blocks is None else _block_rows(module.lora_B, module.r, blocks, rows)
    return LowRank(B, module.lora_A, module.scaling)


# -- peft ------------------------------------------------------------------------------------


def peft_lora(module: nn.Module) -> Optional[Target]:
    """peft ``LoraLayer`` (Linear incl. ``fan_in_fan_out``, Embedding, Conv1d/2d/3d; DoRA).

    The target is the base layer (``get_base_layer()``), which peft calls as a module. ΔW is
    Σ scaling·B@A over the active adapters, or None when adapters are disabled or any is merged
    (peft's forward then runs the base layer alone, its weight already holding the merge).
    """
    if not _has(module, "merged_adapters", "lora_A", "lora_embedding_A", "get_base_layer"):
        return None
    kind = type(module).__name__
    variants = {type(v).__name__ for v in getattr(module, "lora_variant", {}).values()}
    unknown = sorted(v for v in variants if not v.startswith("Dora"))
    if kind in ("MultiheadAttention", "ParamWrapper") or unknown:
        raise ValueError(
            f"flatopt's peft adapter supports LoRA and DoRA on Linear, Embedding and Conv layers, "
            f"not peft's {kind}{f' with {unknown}' if unknown else ''}. Pass adapters=[fn] with fn "
            "returning a flatopt.Target for it (tried before the built-ins)."
        )
    base = module.get_base_layer()
    embedding = len(module.lora_embedding_A) > 0
    if getattr(base, "groups", 1) > 1:
        raise ValueError(
            f"peft LoRA on a grouped conv ({type(base).__name__}, groups={base.groups}) has no "
            "merged weight (peft cannot merge it either). Pass adapters=[fn] with your own "
            "flatopt.Target for it, e.g. flatopt.Target(layer.get_base_layer(), 'weight')."
        )

    def delta() -> Optional[list[LowRank]]:
        if module.disable_adapters or module.merged_adapters:
            return None
        factors = []
        for name in module.active_adapters:
            if embedding and name in module.lora_embedding_A:
                B, A = module.lora_embedding_B[name], module.lora_embedding_A[name]
            elif not embedding and name in module.lora_A:
                B, A = module.lora_B[name].weight, module.lora_A[name].weight
            else:
                continue
            factors.append(LowRank(B, A, module.scaling[name]))
        return factors or None

    # An embedding's rows are its dims, as flatopt.dense; a fan_in_fan_out weight is (in, out).
    transposed = embedding or bool(getattr(module, "fan_in_fan_out", False))
    return Target(base, "weight", delta, transposed=transposed)


# -- loralib ---------------------------------------------------------------------------------


def loralib_lora(module: nn.Module) -> Optional[Target]:
    """loralib ``Linear``, ``MergedLinear``, ``Embedding`` and ``Conv1d/2d/3d`` (``ConvLoRA``).

    They read ``self.weight`` in their own forward. ΔW is None once merged (``.eval()`` with
    ``merge_weights=True``). ``ConvLoRA`` computes with ``self.conv.weight`` in its own forward
    without calling ``self.conv`` while unmerged, so its target is ``"conv.weight"`` on itself.
    """
    if not _has(module, "lora_A", "lora_B", "scaling", "merged", "merge_weights"):
        return None
    if isinstance(getattr(module, "conv", None), nn.Module):
        return _loralib_conv(module)
    rows, blocks = module.lora_B.shape[0], None
    if hasattr(module, "enable_lora"):  # MergedLinear: one rank-r block per enabled group
        rows = module.out_features
        size = rows // len(module.enable_lora)
        blocks = [(g * size, size) for g, on in enumerate(module.enable_lora) if on]

    def delta() -> Optional[LowRank]:
        return None if module.merged else _low_rank(module, blocks, rows)

    transposed = isinstance(module, nn.Embedding) or bool(getattr(module, "fan_in_fan_out", False))
    return Target(module, "weight", delta, transposed)


def _loralib_conv(module: nn.Module) -> Target:
    # Unmerged, ConvLoRA's forward computes with self.conv.weight without calling self.conv,
    # so the hooks go on ConvLoRA itself and it reads the child's weight ("conv.weight").
    def delta() -> Optional[Tensor]:
        if module.merged:
            return None  # merged: ΔW is in W already
        # ΔW = (B @ A) viewed as the kernel: its logical rows are not rows of B @ A.
        return (module.lora_B @ module.lora_A).view(module.conv.weight.shape) * module.scaling

    return Target(module, "conv.weight", delta)


# -- minLoRA-style torch.nn.utils.parametrize ------------------------------------------------


def _parametrization_enabled(p: nn.Module) -> bool:
    if not getattr(p, "enabled", True):
        return False
    forward_fn, lora_forward = getattr(p, "forward_fn", None), getattr(p, "lora_forward", None)
    return forward_fn is None or lora_forward is None or forward_fn == lora_forward


def parametrized_lora(module: nn.Module) -> Optional[Target]:
    """A layer whose ``weight`` is parametrized by minLoRA-style LoRA parametrizations.

    Accessing ``module.weight`` calls ``module.parametrizations.weight``, whose forward reads
    ``original``: that list is the target. Each parametrization adds
    ``scaling · mm(*swap((lora_B, lora_A)))`` viewed as the weight; disabled ones add nothing.
    """
    parametrizations = getattr(module, "parametrizations", None)
    if not isinstance(parametrizations, nn.ModuleDict) or "weight" not in parametrizations:
        return None
    chain = parametrizations["weight"]
    loras = [p for p in chain if _has(p, "lora_A", "lora_B", "scaling")]
    if not loras:
        return None
    if len(loras) != len(chain):
        others = [type(p).__name__ for p in chain if p not in loras]
        raise ValueError(
            f"{type(module).__name__}.weight is parametrized by LoRA and by {others}; flatopt "
            "models W' = W + ΔW only. Pass adapters=[fn] with your own flatopt.Target for it."
        )
    transposed = isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"

    def delta() -> Optional[list[LowRank]]:
        factors = []
        for p in filter(_parametrization_enabled, loras):
            swap = getattr(p, "swap", lambda pair: pair)
            first, second = swap((p.lora_B, p.lora_A))  # ΔW as stored = first @ second
            pair = (second.t(), first.t()) if transposed else (first, second)
            factors.append(LowRank(*pair, p.scaling))
        return factors or None

    return Target(chain, "original", delta, transposed=transposed)


# -- torchtune -------------------------------------------------------------------------------


def torchtune_lora(module: nn.Module) -> Optional[Target]:
    """torchtune ``LoRALinear``, ``QATLoRALinear`` and ``DoRALinear``: they read ``self.weight``.

    ΔW = scaling·B@A (``alpha / rank``), None while ``disabled``. A ``quantize_base=True`` (NF4)
    weight cannot be added to: flatopt then puts its noise on the layer's output side.
    """
    if not _has(module, "lora_a", "lora_b", "disabled", "weight"):
        return None
    if not (hasattr(module, "scaling") or _has(module, "alpha", "rank")):
        return None

    def delta() -> Optional[LowRank]:
        if module.disabled:
            return None
        # DoRALinear stores its scaling; LoRALinear computes alpha / rank in its forward.
        scale = module.scaling if hasattr(module, "scaling") else module.alpha / module.rank
        return LowRank(module.lora_b.weight, module.lora_a.weight, scale)

    return Target(module, "weight", delta)


# -- litgpt ----------------------------------------------------------------------------------


def litgpt_lora(module: nn.Module) -> Optional[Target]:
    """litgpt ``LoRALinear`` and ``LoRAQKVLinear`` (grouped q/k/v ``enable_lora``).

    The target is ``module.linear``, which litgpt calls as a module. ΔW is None once merged.
    """
    if not _has(module, "linear", "lora_A", "lora_B", "scaling", "merged", "r"):
        return None
    rows, blocks = module.linear.out_features, None
    if hasattr(module, "enable_lora"):  # LoRAQKVLinear: rows are q | k | v
        q = module.head_size * module.n_head
        kv = module.head_size * module.n_query_groups
        parts = ((0, q), (q, kv), (q + kv, rows - q - kv))
        blocks = [part for part, on in zip(parts, module.enable_lora) if on]

    def delta() -> Optional[LowRank]:
        return None if module.merged else _low_rank(module, blocks, rows)

    return Target(module.linear, "weight", delta)


ADAPTERS = (peft_lora, loralib_lora, parametrized_lora, torchtune_lora, litgpt_lora)


# -- transformers.Trainer building its own optimizer ------------------------------------------


def trainer_optimizer(
    model: nn.Module,
    args: Any,
    *,
    sigma: float = 0.05,
    schedule: Schedule = "cosine",
    total_steps: Optional[int] = None,
    seed: Optional[int] = None,
    adapters: Iterable[Adapter] = (),
    resample: str = "step",
    rank_noise: bool = True,
) -> tuple[type, dict[str, Any]]:
    """The ``(class, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``: Flat-LoRA
    over the optimizer the Trainer would build itself.

    The Trainer calls the class at ``train()`` with the parameter groups it made (weight decay
    on all but biases and norms). The class builds over them the optimizer ``args.optim`` names,
    with the Trainer's own settings (``Trainer.get_optimizer_cls_and_kwargs``: learning rate,
    betas, epsilon, ``optim_args``), and returns it wrapped in ``FlatPerturb(..., auto=True)``
    over ``model``. The Trainer's LR scheduler, checkpoints and ``resume_from_checkpoint`` then
    work on it as on ``optimizers=(FlatPerturb(...), None)``. transformers is imported only
    then.

    Args:
        model: the LoRA model, the one passed to the Trainer as ``model`` (with TRL's
            ``peft_config=``, apply peft first and pass the peft model).
        args: the Trainer's ``TrainingArguments``.
        sigma: σ, as in `FlatPerturb`.
        schedule: as in `FlatPerturb`.
        total_steps: the length of the ramp in optimizer steps; None takes ``args.max_steps``.
        seed: the root of the noise seeds; None takes ``args.seed``, so a run repeats like the
            rest of the Trainer's randomness, and nothing is drawn from torch's global RNG.
        adapters: as in `FlatPerturb`.
        resample: as in `FlatPerturb`.
        rank_noise: as in `FlatPerturb`.

    Returns:
        ``(cls, kwargs)``: calling ``cls(param_groups, **kwargs)`` returns the `FlatPerturb`.

    Raises:
        ValueError: a bad ``sigma``, ``schedule`` or ``total_steps``, as `FlatPerturb` would
            raise it; a ramp with neither ``total_steps`` nor a positive ``args.max_steps``; or
            no LoRA layer in ``model``. The other arguments are checked by `FlatPerturb` when
            the Trainer builds it; so is ``args.optim``: LOMO and the layer-wise GaLore and
            APOLLO update inside backward, with no step for flatopt to wrap, and are refused.
        TypeError: ``args`` has no ``max_steps`` and ``seed`` (not TrainingArguments).

    Example:
        >>> from types import SimpleNamespace
        >>> from flatopt.lora import add_lora
        >>> net = add_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], rank=2)
        >>> args = SimpleNamespace(max_steps=100, seed=42)  # stands for TrainingArguments
        >>> cls, kwargs = trainer_optimizer(net, args, sigma=0.05)
        >>> kwargs["total_steps"], kwargs["seed"]
        (100, 42)

        With transformers, the pair goes to the Trainer:

        >>> trainer = Trainer(model=net, args=args, train_dataset=data,  # doctest: +SKIP
        ...                   optimizer_cls_and_kwargs=trainer_optimizer(net, args))
    """
    from .perturb import _check_schedule, check_sigma

    if not (hasattr(args, "max_steps") and hasattr(args, "seed")):
        raise TypeError(
            f"Invalid args: {type(args).__name__} has no max_steps and seed. Pass the Trainer's "
            "TrainingArguments, the same object as Trainer(args=...)."
        )
    sigma = check_sigma(sigma)
    if total_steps is None and isinstance(args.max_steps, int) and args.max_steps > 0:
        total_steps = args.max_steps
    if total_steps is None and not callable(schedule) and schedule != "constant":
        raise ValueError(
            f"schedule={schedule!r} needs total_steps, and args.max_steps is {args.max_steps!r} "
            "(training by epochs): flatopt cannot know the number of optimizer steps before the "
            "Trainer counts them. Set TrainingArguments(max_steps=...), pass total_steps= "
            "(epochs * optimizer steps per epoch), or use schedule='constant'."
        )
    _check_schedule(schedule, total_steps)
    adapters = tuple(adapters)
    find_targets(model, adapters)  # no LoRA layer: say so now, not at train()
    kwargs = {
        "lora_model": model,
        "training_args": args,
        "sigma": sigma,
        "schedule": schedule,
        "total_steps": total_steps,
        "seed": args.seed if seed is None else seed,
        "adapters": adapters,
        "resample": resample,
        "rank_noise": rank_noise,
    }
    return _TrainerFlatPerturb, kwargs


class _TrainerFlatPerturb(torch.optim.Optimizer):
    """The class `trainer_optimizer` hands the Trainer: calling it returns a `FlatPerturb`.

    It subclasses ``torch.optim.Optimizer`` only so that the Trainer calls it with the parameter
    groups it built (transformers calls any other callable without them, as a factory of its
    own kind). No instance of it is ever made: ``__new__`` returns a plain FlatPerturb, which
    pickles, copies and checkpoints as one built by hand.
    """

    def __new__(
        cls, params: Any, *, lora_model: nn.Module, training_args: Any, **settings: Any
    ) -> Any:
        from .perturb import FlatPerturb

        inner = _trainer_inner(params, lora_model, training_args)
        return FlatPerturb(inner, lora_model, auto=True, **settings)


def _trainer_inner(params: Any, model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """The optimizer ``Trainer.create_optimizer`` would build over ``params``, as it builds it."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    if "model" in kwargs or "optimizer_dict" in kwargs:  # LOMO, layer-wise GaLore / APOLLO
        raise ValueError(
            f"Invalid args.optim: {args.optim!r} updates the weights inside backward(), with no "
            "optimizer step for flatopt to end the perturbed step at. Pick an optimizer with a "
            "step(), e.g. TrainingArguments(optim='adamw_torch')."
        )
    params = kwargs.pop("params", params)  # GaLore and APOLLO group the parameters themselves
    if isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer):
        return optimizer_cls(params, **kwargs)
    return optimizer_cls()(model, **kwargs)  # transformers' optimizer factories take the model
