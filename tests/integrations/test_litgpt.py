"""flatopt on litgpt's ``LoRALinear`` and ``LoRAQKVLinear`` (grouped q/k/v ``enable_lora``,
with and without grouped-query attention), alone and in a tiny LoRA GPT.

W' is computed here from litgpt's own ``get_lora_AB()`` / ``merge()``, never from flatopt's
adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from litgpt.lora import GPT, Config, LoRALinear, LoRAQKVLinear, mark_only_lora_as_trainable
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
# q | k | v rows of a LoRAQKVLinear with OUT = 64 outputs: head_size 8, 4 query heads and
# 2 key/value groups (grouped-query attention) give 32 | 16 | 16.
QKV = {"head_size": 8, "n_head": 4, "n_query_groups": 2}


def build(kind: str, dtype: torch.dtype, seed: int = 0):
    """(model, layer, x): one litgpt LoRA layer with OUT x FAN_IN W and a large ΔW."""
    W, B, A = merged_case(seed=seed)
    B = B / (ALPHA / RANK)
    if kind == "linear":
        layer = LoRALinear(FAN_IN, OUT, r=RANK, lora_alpha=ALPHA, bias=False)
        factors = (B, A)
    elif kind in ("qkv", "qkv_mha"):
        enable = (True, False, True)
        shape = QKV if kind == "qkv" else {"head_size": 8, "n_head": 2, "n_query_groups": 2}
        out = OUT if kind == "qkv" else 48  # q | k | v = 16 | 16 | 16 without grouped queries
        layer = LoRAQKVLinear(
            FAN_IN, out, r=RANK, lora_alpha=ALPHA, enable_lora=enable, bias=False, **shape
        )
        W = W[:out]
        q = shape["head_size"] * shape["n_head"]
        kv = shape["head_size"] * shape["n_query_groups"]
        # lora_B stacks the q and v blocks; lora_A their rank-r A blocks.
        factors = (torch.cat([B[:q], B[q + kv : out]]), torch.cat([A, A.flip(1)]))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        layer.linear.weight.copy_(W)
        layer.lora_B.copy_(factors[0])
        layer.lora_A.copy_(factors[1])
    model = nn.Sequential(layer, nn.Tanh())
    mark_only_lora_as_trainable(model)
    x = torch.randn(2, 3, FAN_IN, generator=torch.Generator().manual_seed(seed + 1))
    return model.to(dtype), layer, x.to(dtype)


def merged(layer: nn.Module) -> Tensor:
    """W' from litgpt's own merge, on a copy: W + get_lora_AB()."""
    copied = copy.deepcopy(layer)
    copied.merge()
    return copied.linear.weight.detach().double()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "qkv"])
def test_noise_follows_the_law_of_the_merged_weight(kind, dtype):
    model, layer, _ = build(kind, dtype)
    opt = wrap(model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    eye = torch.eye(FAN_IN, dtype=dtype)[None]  # (batch, tokens, features), as litgpt expects
    # layer.linear (no bias) on identity inputs outputs (W + ε)ᵀ: ε exactly.
    eps = read_output_noise(opt, layer.linear, lambda: layer(eye))[0].t()
    W = layer.linear.weight.detach().double()
    assert_law(eps, law_std(merged(layer), 0.1), dtype, wrong=law_std(W, 0.1))


@pytest.mark.parametrize("kind", ["qkv", "qkv_mha"])
def test_qkv_delta_is_the_zero_padded_grouped_update(kind):
    """Only q and v rows get LoRA; their blocks are B_q @ A_q and B_v @ A_v, not B @ A."""
    model, layer, _ = build(kind, torch.float64)
    delta = wrap(model)._sites[0].target.delta()
    expected = merged(layer) - layer.linear.weight.double()
    torch.testing.assert_close(delta.dense(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta.dense(), layer.get_lora_AB())
    q = layer.head_size * layer.n_head
    kv = layer.head_size * layer.n_query_groups
    assert not expected[q : q + kv].any()  # keys: no LoRA
    assert expected[1:q].abs().sum(1).min() > 0 and expected[q + kv :].abs().sum(1).min() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "qkv", "qkv_mha"])
def test_round_trip_is_bitwise_exact(kind, dtype):
    model, _, x = build(kind, dtype)
    check_round_trip(model, lambda: model(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "qkv", "qkv_mha"])
def test_lora_gradients_match_the_explicit_reference(kind, dtype):
    model, layer, x = build(kind, dtype)
    check_reference(model, lambda call: call(x), lambda: {layer.linear: merged(layer)}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "qkv"])
def test_merged_is_not_counted_twice(kind, dtype):
    model, layer, _ = build(kind, dtype)
    delta = merged(layer) - layer.linear.weight.double()
    layer.merge()
    assert layer.merged
    W = layer.linear.weight.detach().double()  # holds ΔW now
    opt = wrap(model, sigma=0.1)
    eye = torch.eye(FAN_IN, dtype=dtype)[None]
    eps = read_output_noise(opt, layer.linear, lambda: layer(eye))[0].t()
    assert_law(eps, law_std(W, 0.1), dtype, wrong=law_std(W + delta, 0.1))


def _tiny_gpt(dtype: torch.dtype) -> GPT:
    config = Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_query_groups=2,
        vocab_size=64,
        padded_vocab_size=64,
        block_size=16,
        lora_r=2,
        lora_alpha=4,
        lora_query=True,
        lora_key=False,
        lora_value=True,
        lora_projection=True,
        lora_mlp=True,
        lora_head=True,
    )
    torch.manual_seed(0)
    model = GPT(config)
    mark_only_lora_as_trainable(model)
    for module in model.modules():
        if isinstance(module, LoRALinear):  # B starts at 0: give W' its low-rank part
            nn.init.normal_(module.lora_B, std=0.2)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_tiny_lora_gpt(dtype):
    model = _tiny_gpt(dtype)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = wrap(model)
    assert len(opt.targets) == len(layers) == 1 + 2 * 4
    check_round_trip(model, lambda: model(tokens))
    merged_all = lambda: {layer.linear: merged(layer) for layer in layers}  # noqa: E731
    check_reference(model, lambda call: call(tokens), merged_all, dtype)


def test_state_dict_keys_are_unchanged_by_wrapping():
    model = _tiny_gpt(torch.float32)
    keys = list(model.state_dict())
    opt = wrap(model)
    with opt.perturbed():
        model(torch.zeros(1, 4, dtype=torch.long))
        assert list(model.state_dict()) == keys
    assert list(model.state_dict()) == keys
