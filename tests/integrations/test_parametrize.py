"""flatopt on parametrization-based LoRA (minLoRA style, ``torch.nn.utils.parametrize``).

minLoRA is not on PyPI, so `LoRAParametrization` below follows its design: factors ``lora_A``,
``lora_B``, a ``swap`` for weights stored ``(fan_in, fan_out)`` (embeddings), ``scaling``, and
``enable_lora``/``disable_lora`` switching ``forward_fn``. Needs torch only.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from lora_checks import (
    DTYPES,
    FAN_IN,
    OUT,
    RANK,
    assert_law,
    check_reference,
    check_round_trip,
    law_std,
    merged_case,
    read_output_noise,
    wrap,
)
from torch import Tensor, nn

from flatopt.integrations import ADAPTERS, parametrized_lora


class LoRAParametrization(nn.Module):
    """minLoRA-style: ``W ↦ W + scaling · mm(*swap((lora_B, lora_A))).view(W.shape)``."""

    def __init__(self, fan_in: int, fan_out: int, fan_in_fan_out=False, rank=4, alpha=8.0):
        super().__init__()
        self.swap = (lambda pair: (pair[1], pair[0])) if fan_in_fan_out else (lambda pair: pair)
        self.lora_A = nn.Parameter(torch.zeros(self.swap((rank, fan_in))))
        self.lora_B = nn.Parameter(torch.zeros(self.swap((fan_out, rank))))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.forward_fn = self.lora_forward

    def lora_forward(self, X: Tensor) -> Tensor:
        return X + torch.mm(*self.swap((self.lora_B, self.lora_A))).view(X.shape) * self.scaling

    def forward(self, X: Tensor) -> Tensor:
        return self.forward_fn(X)

    def disable_lora(self) -> None:
        self.forward_fn = lambda X: X

    def enable_lora(self) -> None:
        self.forward_fn = self.lora_forward

    @classmethod
    def from_layer(cls, layer: nn.Module, rank: int = RANK) -> LoRAParametrization:
        if isinstance(layer, nn.Embedding):  # stored (num_embeddings, dim): fan_in first
            fan_in, fan_out = layer.weight.shape
            return cls(fan_in, fan_out, fan_in_fan_out=True, rank=rank)
        fan_out, fan_in = layer.weight.reshape(layer.weight.shape[0], -1).shape
        return cls(fan_in, fan_out, rank=rank)


def add_lora(layer: nn.Module, rank: int = RANK) -> LoRAParametrization:
    layer.requires_grad_(False)
    lora = LoRAParametrization.from_layer(layer, rank)
    parametrize.register_parametrization(layer, "weight", lora)
    return lora


def _set(lora: LoRAParametrization, B: Tensor, A: Tensor) -> None:
    """Make the parametrization's ΔW equal B @ A in the logical (rows, n) layout."""
    B = B / lora.scaling
    with torch.no_grad():
        if lora.lora_A.shape[0] == A.shape[0]:
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        else:  # swapped (embedding): stored ΔW = A' @ B' = (B @ A)ᵀ
            lora.lora_A.copy_(A.t())
            lora.lora_B.copy_(B.t())


class Case(NamedTuple):
    model: nn.Sequential
    layer: nn.Module
    to_logical: Callable[[Tensor], Tensor]
    forward: Callable[[Callable], object]


def build(kind: str, dtype: torch.dtype, seed: int = 0) -> Case:
    W, B, A = merged_case(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind in ("linear", "stacked", "disabled"):
        layer, stored = nn.Linear(FAN_IN, OUT, bias=False), W
        x = torch.randn(4, FAN_IN, generator=g)
    elif kind == "embedding":
        layer, stored = nn.Embedding(FAN_IN, OUT), W.t()
        x = torch.randint(0, FAN_IN, (4, 6), generator=g)
    elif kind == "conv2d":
        layer, stored = nn.Conv2d(FAN_IN // 16, OUT, 4, bias=False), W.view(OUT, -1, 4, 4)
        x = torch.randn(2, FAN_IN // 16, 6, 6, generator=g)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        layer.weight.copy_(stored)
    _set(add_lora(layer), B, A)
    if kind == "stacked":  # two LoRAs on one weight, both applied
        _, B2, A2 = merged_case(seed=seed + 3)
        _set(add_lora(layer, rank=2), B2.flip(0)[:, :2], A2[:2])
    if kind == "disabled":
        layer.parametrizations.weight[0].disable_lora()
    model = nn.Sequential(layer, nn.Tanh()).to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x

    def to_logical(t: Tensor) -> Tensor:
        return t.t() if kind == "embedding" else t.reshape(OUT, -1)

    return Case(model, layer, to_logical, lambda call: call(x))


def original(case: Case) -> Tensor:
    return case.layer.parametrizations.weight.original


def merged_logical(case: Case) -> Tensor:
    """W' is what the parametrization computes: ``layer.weight`` itself, clean."""
    with torch.no_grad():
        return case.to_logical(case.layer.weight.double())


KINDS = ["linear", "embedding", "conv2d", "stacked", "disabled"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_noise_follows_the_law_of_the_merged_weight(kind, dtype):
    case = build(kind, dtype)
    opt = wrap(case.model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    # Accessing layer.weight runs the parametrization list, whose forward reads `original`:
    # the hooks fire there, and layer.weight comes out as W + ε + ΔW.
    plist = case.layer.parametrizations.weight
    eps = case.to_logical(read_output_noise(opt, plist, lambda: case.layer.weight))
    base, merged = case.to_logical(original(case).double()), merged_logical(case)
    if kind == "disabled":  # W' = W: the LoRA term is off
        W, B, A = merged_case()
        assert torch.equal(merged, base)
        assert_law(eps, law_std(merged, 0.1), dtype, wrong=law_std(W + B @ A, 0.1))
    else:
        assert_law(eps, law_std(merged, 0.1), dtype, wrong=law_std(base, 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise_exact(kind, dtype):
    case = build(kind, dtype)
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "disabled"])  # no LoRA grads
def test_lora_gradients_match_the_explicit_reference(kind, dtype):
    case = build(kind, dtype)
    plist = case.layer.parametrizations.weight
    # functional_call replaces `0.parametrizations.weight.original` in the whole model.
    check_reference(case.model, case.forward, lambda: {plist: merged_logical(case)}, dtype)


def test_hooks_fire_on_every_access_of_the_parametrized_weight():
    case = build("linear", torch.float32)
    opt = wrap(case.model, sigma=0.1)
    clean = case.layer.weight.detach().clone()
    with torch.no_grad(), opt.perturbed():
        first, second = case.layer.weight.clone(), case.layer.weight.clone()
        assert torch.equal(first, second)  # one ε per step, at every access
        assert not torch.equal(first, clean)
        with parametrize.cached():  # parametrize's cache computes it once, under the noise
            assert torch.equal(case.layer.weight, first)
    assert torch.equal(case.layer.weight, clean)


def test_another_parametrization_on_the_weight_is_refused():
    case = build("linear", torch.float32)
    parametrize.register_parametrization(case.layer, "weight", _Scale())
    with pytest.raises(ValueError, match=r"parametrized by LoRA and by \['_Scale'\]"):
        wrap(case.model)


class _Scale(nn.Module):
    def forward(self, X: Tensor) -> Tensor:
        return 2 * X


def test_state_dict_keys_are_unchanged_by_wrapping():
    cases = [build(kind, torch.float32) for kind in KINDS]
    model = nn.ModuleList([case.model for case in cases])
    keys = list(model.state_dict())
    assert "0.0.parametrizations.weight.original" in keys
    opt = wrap(model)
    assert [name for name, _ in opt.targets] == [f"{i}.0" for i in range(len(KINDS))]
    with opt.perturbed():
        for case in cases:
            case.forward(case.model)
        assert list(model.state_dict()) == keys
    assert list(model.state_dict()) == keys


def test_flatopt_imports_no_lora_library():
    import subprocess
    import sys

    code = (
        "import sys, flatopt; from flatopt.lora import add_lora; import torch\n"
        "net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ['0'])\n"
        "flatopt.FlatPerturb(torch.optim.SGD(net.parameters(), lr=1), net, total_steps=1)\n"
        "libs = ('peft', 'loralib', 'minlora', 'torchtune', 'litgpt', 'transformers', 'torchao')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in libs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert parametrized_lora in ADAPTERS
