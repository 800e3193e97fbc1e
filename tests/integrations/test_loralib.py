"""flatopt on loralib (Microsoft's LoRA): ``Linear`` (also ``fan_in_fan_out``), ``MergedLinear``
with grouped ``enable_lora``, ``Embedding``, and ``Conv1d``/``Conv2d`` (``ConvLoRA``).

W' is read off loralib's own merge (``.eval()`` with ``merge_weights=True`` on a copy), never
from flatopt's adapter.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import loralib
import pytest
import torch
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

ALPHA = 8  # scaling alpha / r = 2


class Case(NamedTuple):
    model: nn.Sequential  # the loralib layer, then a Tanh
    eye: Callable[[], object]  # runs the layer on identity inputs
    to_logical: Callable[[Tensor], Tensor]  # its (noise of the) output or weight -> (rows, n)
    forward: Callable[[Callable], object]  # runs a model-like callable on random inputs


def build(kind: str, dtype: torch.dtype, seed: int = 0) -> Case:
    """One loralib layer with OUT x FAN_IN logical weight W and a large ΔW (see merged_case)."""
    W, B, A = merged_case(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    B = B / (ALPHA / RANK)
    x = torch.randn(4, FAN_IN, generator=g)
    if kind in ("linear", "fan_in_fan_out"):
        fan_in_fan_out = kind == "fan_in_fan_out"
        layer = loralib.Linear(
            FAN_IN, OUT, r=RANK, lora_alpha=ALPHA, bias=False, fan_in_fan_out=fan_in_fan_out
        )
        stored, eye = (W.t() if fan_in_fan_out else W), torch.eye(FAN_IN)
        factors = (B, A)
    elif kind == "merged_linear":  # grouped rows, as q | k | v with LoRA on some of them
        stored, eye = W, torch.eye(FAN_IN)
        size = OUT // 4  # four groups of rows, LoRA on groups 0 and 2
        layer = loralib.MergedLinear(
            FAN_IN,
            OUT,
            r=RANK,
            lora_alpha=ALPHA,
            enable_lora=[True, False, True, False],
            bias=False,
        )
        # lora_B stacks the enabled groups' B blocks, lora_A their A blocks (rank r each).
        factors = (torch.cat([B[:size], B[2 * size : 3 * size]]), torch.cat([A, A.flip(1)]))
    elif kind == "embedding":  # rows are the embedding dims
        layer = loralib.Embedding(FAN_IN, OUT, r=RANK, lora_alpha=ALPHA)
        stored, eye = W.t(), torch.arange(FAN_IN)
        x = torch.randint(0, FAN_IN, (4, 6), generator=g)
        factors = (B, A)
    elif kind == "conv2d":
        layer = loralib.Conv2d(FAN_IN // 16, OUT, 4, r=RANK, lora_alpha=ALPHA, bias=False)
        stored = W.view(OUT, FAN_IN // 16, 4, 4)
        eye = torch.eye(FAN_IN).view(FAN_IN, -1, 4, 4)
        x = torch.randn(2, FAN_IN // 16, 6, 6, generator=g)
        factors = None
    elif kind == "conv1d":  # loralib's Conv1d only works with kernel_size=1 (its ΔW view fails)
        layer = loralib.Conv1d(FAN_IN, OUT, 1, r=RANK, lora_alpha=ALPHA, bias=False)
        stored, eye = W.view(OUT, FAN_IN, 1), torch.eye(FAN_IN).view(FAN_IN, -1, 1)
        x = torch.randn(2, FAN_IN, 7, generator=g)
        factors = None
    else:
        raise ValueError(kind)
    weight = layer.conv.weight if kind.startswith("conv") else layer.weight
    with torch.no_grad():
        weight.copy_(stored)
        if factors is None:  # ConvLoRA: lora_B (out·k, r·k) @ lora_A (r·k, in·k), as a view
            gen = torch.Generator().manual_seed(seed + 2)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        else:
            layer.lora_B.copy_(factors[0])
            layer.lora_A.copy_(factors[1])
    model = nn.Sequential(layer, nn.Tanh()).to(dtype)
    eye = eye.to(dtype) if eye.is_floating_point() else eye
    x = x.to(dtype) if x.is_floating_point() else x

    def to_logical(t: Tensor) -> Tensor:
        if kind in ("fan_in_fan_out", "embedding"):
            return t.reshape(-1, OUT).t()
        return t.reshape(FAN_IN, OUT).t() if t.shape[0] == FAN_IN else t.reshape(OUT, -1)

    return Case(model, lambda: layer(eye), to_logical, lambda call: call(x))


def merged_logical(case: Case) -> Tensor:
    """W' from loralib's own merge: ``.eval()`` on a copy adds its ΔW into the weight."""
    layer = copy.deepcopy(case.model[0])
    if not layer.merged:
        layer.train(False)
    assert layer.merged
    weight = layer.conv.weight if hasattr(layer, "conv") else layer.weight
    return case.to_logical(weight.detach().double())


def plain_logical(case: Case) -> Tensor:
    layer = case.model[0]
    weight = layer.conv.weight if hasattr(layer, "conv") else layer.weight
    return case.to_logical(weight.detach().double())


KINDS = ["linear", "fan_in_fan_out", "merged_linear", "embedding"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_noise_follows_the_law_of_the_merged_weight(kind, dtype):
    case = build(kind, dtype)
    opt = wrap(case.model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    # The layer's output on identity inputs is W'ᵀ (x·Wᵀ plus the LoRA branch): the noisy
    # minus the clean output is ε, up to the rounding of that sum (the bf16 slack covers it).
    eps = case.to_logical(read_output_noise(opt, case.model[0], case.eye))
    merged = merged_logical(case)
    assert_law(eps, law_std(merged, 0.1), dtype, wrong=law_std(plain_logical(case), 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise_exact(kind, dtype):
    case = build(kind, dtype)
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_gradients_match_the_explicit_reference(kind, dtype):
    case = build(kind, dtype)
    layer = case.model[0]
    check_reference(case.model, case.forward, lambda: {layer: merged_logical(case)}, dtype)


def test_merged_linear_delta_is_the_zero_padded_grouped_update():
    """MergedLinear's ΔW is block-structured over the output rows, not lora_B @ lora_A."""
    case = build("merged_linear", torch.float64)
    layer = case.model[0]
    delta = wrap(case.model)._sites[0].target.delta()
    expected = merged_logical(case) - plain_logical(case)
    torch.testing.assert_close(delta.dense(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta.dense(), layer.merge_AB() * layer.scaling)
    assert not expected[16:32].any() and not expected[48:].any()  # groups without LoRA
    assert expected[1:16].abs().sum(1).min() > 0 and expected[32:48].abs().sum(1).min() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_merged_after_eval_is_not_counted_twice(kind, dtype):
    case = build(kind, dtype)
    delta = merged_logical(case) - plain_logical(case)  # loralib's own ΔW
    case.model.eval()  # merge_weights=True: loralib adds ΔW into W
    layer = case.model[0]
    assert layer.merged
    merged = plain_logical(case)
    opt = wrap(case.model, sigma=0.1)
    eps = case.to_logical(read_output_noise(opt, layer, case.eye))
    assert_law(eps, law_std(merged, 0.1), dtype, wrong=law_std(merged + delta, 0.1))
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_conv_lora_merged_follows_the_law(kind, dtype):
    case = build(kind, dtype)
    delta = merged_logical(case) - plain_logical(case)  # loralib's own ΔW, large here
    case.model.eval()  # merged: ConvLoRA's forward then calls self.conv as a module
    merged = plain_logical(case)
    opt = wrap(case.model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    eps = case.to_logical(read_output_noise(opt, case.model[0].conv, case.eye))
    assert_law(eps, law_std(merged, 0.1), dtype, wrong=law_std(merged + delta, 0.1))
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_conv_lora_unmerged_follows_the_law_of_its_own_merge(kind, dtype):
    case = build(kind, dtype)
    merged = merged_logical(case)  # W + ΔW from loralib's own merge (on a copy)
    plain = plain_logical(case)
    opt = wrap(case.model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    # The whole ConvLoRA's output, clean and noisy: both include ΔW, so the difference is ε.
    eps = case.to_logical(read_output_noise(opt, case.model[0], case.eye))
    assert_law(eps, law_std(merged, 0.1), dtype, wrong=law_std(plain, 0.1))
    check_round_trip(case.model, lambda: case.forward(case.model))


def test_state_dict_keys_are_unchanged_by_wrapping():
    cases = [build(kind, torch.float32) for kind in KINDS]
    model = nn.ModuleList([case.model for case in cases])
    keys = list(model.state_dict())
    opt = wrap(model)
    assert len(opt.targets) == len(KINDS)
    assert list(model.state_dict()) == keys
    with opt.perturbed():
        for case in cases:
            case.forward(case.model)
        assert list(model.state_dict()) == keys
