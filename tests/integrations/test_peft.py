"""flatopt on peft's LoRA layers: Linear (also GPT-2's ``Conv1D`` with ``fan_in_fan_out``),
Embedding, Conv1d/Conv2d, rsLoRA, DoRA, several adapters, merged and disabled adapters.

W' is computed here from peft's own ``get_delta_weight`` (or read off the merged base weight),
never from flatopt's adapter.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import peft
import pytest
import torch
import transformers
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
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

ALPHA = 8  # scaling alpha / r = 2 (rsLoRA: alpha / √r = 4)


class Case(NamedTuple):
    model: nn.Module  # the PeftModel
    layer: nn.Module  # its LoRA layer
    eye: Callable[[], object]  # runs the model on identity inputs
    to_logical: Callable[[Tensor], Tensor]  # a (noise of the) base output / weight -> (rows, n)
    forward: Callable[[Callable], object]  # runs a model-like callable on random inputs


def _config(**kwargs) -> LoraConfig:
    return LoraConfig(target_modules=["0"], r=RANK, lora_alpha=ALPHA, **kwargs)


def build(kind: str, dtype: torch.dtype, config: LoraConfig | None = None, seed: int = 0) -> Case:
    """One peft LoRA layer with OUT x FAN_IN logical weight W and a large ΔW (see merged_case)."""
    W, B, A = merged_case(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind in ("linear", "rslora", "dora"):
        base = nn.Linear(FAN_IN, OUT, bias=False)
        stored, eye = W, torch.eye(FAN_IN)
        x = torch.randn(4, FAN_IN, generator=g)
    elif kind == "gpt2_conv1d":  # stored (in, out), forward x @ weight + bias
        base = Conv1D(OUT, FAN_IN)
        nn.init.zeros_(base.bias)
        stored, eye = W.t(), torch.eye(FAN_IN)
        x = torch.randn(4, FAN_IN, generator=g)
    elif kind in ("embedding", "dora_embedding"):  # rows are the embedding dims
        base = nn.Embedding(FAN_IN, OUT)
        stored, eye = W.t(), torch.arange(FAN_IN)
        x = torch.randint(0, FAN_IN, (4, 6), generator=g)
    elif kind == "conv1d":
        base = nn.Conv1d(FAN_IN // 4, OUT, 4, bias=False)
        stored, eye = W.view(OUT, FAN_IN // 4, 4), torch.eye(FAN_IN).view(FAN_IN, -1, 4)
        x = torch.randn(2, FAN_IN // 4, 7, generator=g)
    elif kind in ("conv2d", "dora_conv2d"):
        base = nn.Conv2d(FAN_IN // 16, OUT, 4, bias=False)
        stored = W.view(OUT, FAN_IN // 16, 4, 4)
        eye = torch.eye(FAN_IN).view(FAN_IN, -1, 4, 4)
        x = torch.randn(2, FAN_IN // 16, 6, 6, generator=g)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        base.weight.copy_(stored)
    if config is None:
        config = _config(
            fan_in_fan_out=kind == "gpt2_conv1d",
            use_rslora=kind == "rslora",
            use_dora=kind.startswith("dora"),
        )
    model = get_peft_model(nn.Sequential(base), config).to(dtype)
    layer = model.base_model.model[0]
    _set_factors(layer, "default", B, A)

    def to_logical(t: Tensor) -> Tensor:
        if kind in ("gpt2_conv1d", "embedding", "dora_embedding"):  # stored (n, rows)
            return t.reshape(-1, OUT).t()
        # An output on identity inputs is (n, rows, 1…); a weight is (rows, n…).
        return t.reshape(FAN_IN, OUT).t() if t.shape[0] == FAN_IN else t.reshape(OUT, -1)

    eye = eye.to(dtype) if eye.is_floating_point() else eye  # token ids stay integers
    x = x.to(dtype) if x.is_floating_point() else x
    return Case(model, layer, lambda: model(eye), to_logical, lambda call: call(x))


def _set_factors(layer: nn.Module, name: str, B: Tensor, A: Tensor) -> None:
    """Set adapter ``name``'s factors so that its ΔW = B @ A in the logical layout."""
    B = B / layer.scaling[name]
    with torch.no_grad():
        if name in layer.lora_embedding_A:
            layer.lora_embedding_A[name].copy_(A)
            layer.lora_embedding_B[name].copy_(B)
        else:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(A.view(a.shape))
            b.copy_(B.view(b.shape))


def merged_logical(case: Case) -> Tensor:
    """W' as peft's forward applies it, from peft's own helpers, logical (rows, n), fp64."""
    layer = case.layer
    weight = layer.get_base_layer().weight.detach().double()
    if not layer.disable_adapters and not layer.merged:
        for name in layer.active_adapters:
            weight = weight + layer.get_delta_weight(name).detach().double()
    return case.to_logical(weight)


def _base_noise(case: Case, opt) -> Tensor:
    """ε read off the base layer's output on identity inputs (no bias): exactly fl(W + ε) − W."""
    return case.to_logical(read_output_noise(opt, case.layer.get_base_layer(), case.eye))


KINDS = ["linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "rslora", "dora"]
KINDS += ["dora_conv2d", "dora_embedding"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_noise_follows_the_law_of_the_merged_weight(kind, dtype):
    case = build(kind, dtype)
    opt = wrap(case.model, sigma=0.1)
    assert opt.targets == [("base_model.model.0", (OUT, FAN_IN))]
    eps = _base_noise(case, opt)
    base = case.to_logical(case.layer.get_base_layer().weight)
    assert_law(eps, law_std(merged_logical(case), 0.1), dtype, wrong=law_std(base, 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise_exact(kind, dtype):
    case = build(kind, dtype)
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_gradients_match_the_explicit_reference(kind, dtype):
    case = build(kind, dtype)
    # peft's DoRA takes its norm of the base weight outside the base layer's forward: only that
    # forward may see W + ε, so the reference swaps it there rather than in the whole model.
    via = "hooks" if kind.startswith("dora") else "functional_call"
    base = case.layer.get_base_layer()
    check_reference(case.model, case.forward, lambda: {base: merged_logical(case)}, dtype, via=via)


def _two_adapters(dtype: torch.dtype) -> Case:
    case = build("linear", dtype)
    case.model.add_adapter("other", _config())
    _, B, A = merged_case(seed=7)
    _set_factors(case.layer, "other", B.flip(0), A)  # large where "default" is small
    case.model.base_model.set_adapter(["default", "other"])
    return case


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_several_active_adapters_all_count(dtype):
    case = _two_adapters(dtype)
    layer = case.layer
    assert layer.active_adapters == ["default", "other"]
    opt = wrap(case.model, sigma=0.1)
    only_default = case.to_logical(
        layer.get_base_layer().weight.double() + layer.get_delta_weight("default").double()
    )
    expected, wrong = law_std(merged_logical(case), 0.1), law_std(only_default, 0.1)
    assert_law(_base_noise(case, opt), expected, dtype, wrong=wrong)
    base = layer.get_base_layer()
    check_reference(case.model, case.forward, lambda: {base: merged_logical(case)}, dtype)
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["all", "one"])
def test_merged_adapters_are_not_counted_twice(which, dtype):
    case = _two_adapters(dtype)
    layer = case.layer
    delta = layer.get_delta_weight("default").double()
    case.model.base_model.merge_adapter(["default"] if which == "one" else None)
    assert layer.merged
    # Merged, peft's forward runs the base layer alone: W' is the merged base weight, and an
    # active adapter left unmerged ("one") is not applied either.
    base = layer.get_base_layer()
    with torch.no_grad():
        assert torch.equal(case.forward(case.model), case.forward(base))
    merged = case.to_logical(base.weight.double())
    opt = wrap(case.model, sigma=0.1)
    twice = law_std(merged + case.to_logical(delta), 0.1)
    assert_law(_base_noise(case, opt), law_std(merged, 0.1), dtype, wrong=twice)
    check_round_trip(case.model, lambda: case.forward(case.model))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_disabled_adapters_add_nothing(dtype):
    case = build("linear", dtype)
    base = case.layer.get_base_layer()
    opt = wrap(case.model, sigma=0.1)
    with case.model.disable_adapter():
        assert case.layer.disable_adapters
        eps = _base_noise(case, opt)
    plain = case.to_logical(base.weight)
    enabled = case.to_logical(base.weight.double() + case.layer.get_delta_weight("default"))
    assert_law(eps, law_std(plain, 0.1), dtype, wrong=law_std(enabled, 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_tiny_gpt2_with_lora_everywhere(dtype):
    """A real transformers model: Conv1D (fan_in_fan_out) attention and MLP, and the token
    embedding, all through peft."""
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    lora = LoraConfig(
        target_modules=["c_attn", "c_proj", "c_fc", "wte"],
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    model = get_peft_model(model, lora).to(dtype)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = wrap(model)
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(opt.targets) == len(layers) == 1 + 2 * 4
    assert all(shape[0] > 0 for _, shape in opt.targets)
    check_round_trip(model, lambda: model(tokens).last_hidden_state)

    def merged():
        out = {}
        for layer in layers:
            weight = layer.get_base_layer().weight.double()
            weight = weight + layer.get_delta_weight("default").double()
            out[layer.get_base_layer()] = weight.t()  # Conv1D (in, out); embedding rows = dims
        return out

    check_reference(model, lambda call: call(tokens).last_hidden_state, merged, dtype)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Conv2d(4, 8, 3, groups=2), r"grouped conv \(Conv2d, groups=2\).*adapters=\[fn\]"),
        (nn.MultiheadAttention(8, 2), r"not peft's MultiheadAttention.*adapters=\[fn\]"),
    ],
    ids=["grouped-conv", "multihead-attention"],
)
def test_unsupported_peft_layers_fail_with_the_fix(layer, match):
    model = get_peft_model(nn.Sequential(layer), LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(ValueError, match=match):
        wrap(model)


def test_state_dict_keys_are_unchanged_by_wrapping():
    case = _two_adapters(torch.float32)
    keys = list(case.model.state_dict())
    opt = wrap(case.model)
    assert list(case.model.state_dict()) == keys
    with opt.perturbed():
        case.forward(case.model)
        assert list(case.model.state_dict()) == keys
    assert list(case.model.state_dict()) == keys


def test_dora_scales_the_noise_by_the_magnitude_over_the_clean_norm():
    """peft's DoRA: the base layer's output carries ε; DoRA then rescales it by m_i/‖W'_i‖,
    that norm taken of the clean W' (outside the base layer's forward). So the effective
    weight is m/‖W'‖·(W' + ε): its rows get noise of std σ·m_i/√n, the law for that weight."""
    case = build("dora", torch.float32)
    layer = case.layer
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        magnitude.mul_(torch.linspace(0.5, 2, OUT))
    opt = wrap(case.model, sigma=0.1)
    eps = _base_noise(case, opt)
    total = case.to_logical(read_output_noise(opt, layer, case.eye))
    norms = torch.linalg.vector_norm(merged_logical(case), dim=1)
    scale = magnitude.detach().double() / norms
    assert scale.max() - scale.min() > 0.5  # the rescaling is visible
    torch.testing.assert_close(total, scale[:, None] * eps, rtol=1e-4, atol=1e-6)
