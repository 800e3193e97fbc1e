"""A minimal, readable LoRA: the reference layer flatopt is taught and tested with.

``LoRALinear`` computes ``base(x) + scaling · B(A(dropout(x)))`` with ``scaling = alpha / r``.
A starts random and B at zero, so a fresh layer equals its base layer exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor, nn

from .noise import LowRank

__all__ = ["LoRALinear", "add_lora"]


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update ``scaling · B @ A``.

    Args:
        base: the linear layer to adapt; its parameters are left as they are (``add_lora``
            freezes them).
        rank: r, the inner dimension of A ``(r, in)`` and B ``(out, r)``.
        alpha: the scaling is ``alpha / rank``.
        dropout: dropout applied to the input of the low-rank path only.

    Raises:
        TypeError: ``base`` is not an ``nn.Linear``.
        ValueError: ``rank`` is not a positive integer, or ``dropout`` is outside [0, 1).

    Example:
        >>> layer = LoRALinear(torch.nn.Linear(8, 4), rank=2, alpha=4)
        >>> layer(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        kwargs = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return self.base(x) + self.scaling * update

    def low_rank(self) -> LowRank:
        """ΔW = ``scaling · B @ A`` as factors, for the row norms of the merged weight."""
        return LowRank(self.lora_B, self.lora_A, self.scaling)

    def merged_weight(self) -> Tensor:
        """Return W + scaling · B @ A as a new tensor (the base weight is not written)."""
        return self.base.weight + self.low_rank().dense().to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, target_names: Optional[set[str]]) -> bool:
    if target_names is None:
        return True
    return name in target_names or name.rsplit(".", 1)[-1] in target_names


def add_lora(
    model: nn.Module,
    target_names: Optional[Iterable[str]] = None,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
) -> nn.Module:
    """Replace the named ``nn.Linear`` modules by `LoRALinear` and freeze the rest.

    A module matches when its qualified name, or the last part of it, is in ``target_names``
    (so ``["q", "v"]`` matches ``blocks.0.attn.q``). ``None`` adapts every ``nn.Linear``.
    Every parameter that is not a LoRA factor gets ``requires_grad=False``; layers that are
    already `LoRALinear` are left as they are, so calling it again adds layers only.

    Args:
        model: the model to modify in place.
        target_names: names of the linear layers to adapt, or None for all of them.
        rank: LoRA rank r.
        alpha: LoRA alpha; the scaling is ``alpha / rank``.
        dropout: dropout on the LoRA path's input.

    Returns:
        The same ``model``, modified in place.

    Raises:
        TypeError: a named module exists but is not an ``nn.Linear``.
        ValueError: no ``nn.Linear`` matched ``target_names``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net = add_lora(net, ["0", "2"], rank=2)
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.lora_A', '0.lora_B', '2.lora_A', '2.lora_B']
    """
    if isinstance(target_names, str):
        target_names = [target_names]
    wanted = None if target_names is None else set(target_names)
    existing = [m for m in model.modules() if isinstance(m, LoRALinear)]
    keep = {id(p) for m in existing for p in (m.lora_A, m.lora_B)}
    for parameter in model.parameters():
        if id(parameter) not in keep:  # LoRA factors added earlier stay trainable
            parameter.requires_grad_(False)
    chosen, adapted = [], False
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear))
    for name, module in model.named_modules():
        if not name or not _matches(name, wanted) or name.startswith(inside):
            continue
        if isinstance(module, nn.Linear):
            chosen.append(name)
        elif isinstance(module, LoRALinear):
            adapted = True
        elif wanted is not None and name in wanted:
            raise TypeError(
                f"add_lora target {name!r} is a {type(module).__name__}, not an nn.Linear."
            )
    if not chosen and not adapted:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"add_lora found no nn.Linear named {sorted(wanted or [])}; linear layers in the "
            f"model: {linear}."
        )
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return model
