"""flatopt.lora: the reference LoRA layer and add_lora."""

import pytest
import torch
from torch import nn

from flatopt.lora import LoRALinear, add_lora


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def _model():
    return nn.ModuleDict({"attn": Attention(), "head": nn.Linear(8, 2)})


def test_a_fresh_layer_equals_its_base_and_the_update_is_scaled_b_a(device):
    base = nn.Linear(6, 4, device=device)
    layer = LoRALinear(base, rank=2, alpha=6)
    assert layer.lora_A.device == layer.lora_B.device == base.weight.device
    x = torch.randn(3, 6, device=device)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    nn.init.normal_(layer.lora_B)
    expected = base(x) + 3.0 * x @ (layer.lora_B @ layer.lora_A).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.merged_weight(), base.weight + 3.0 * layer.lora_B @ layer.lora_A
    )
    low_rank = layer.low_rank()
    assert low_rank.B is layer.lora_B and low_rank.A is layer.lora_A and low_rank.scale == 3.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_factors_follow_the_base_dtype(dtype, device):
    layer = LoRALinear(nn.Linear(5, 3).to(device, dtype), rank=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == dtype
    assert layer.lora_A.device.type == layer.lora_B.device.type == device
    assert layer.lora_A.shape == (2, 5) and layer.lora_B.shape == (3, 2)


def test_add_lora_matches_by_suffix_and_freezes_everything_else():
    model = add_lora(_model(), ["q", "v"], rank=2, alpha=4, dropout=0.1)
    assert isinstance(model["attn"].q, LoRALinear) and isinstance(model["attn"].v, LoRALinear)
    assert isinstance(model["attn"].k, nn.Linear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["attn.q.lora_A", "attn.q.lora_B", "attn.v.lora_A", "attn.v.lora_B"]
    assert isinstance(model["attn"].q.dropout, nn.Dropout)


def test_add_lora_by_qualified_name_and_all_linear_layers():
    model = add_lora(_model(), ["attn.k"], rank=2)
    assert isinstance(model["attn"].k, LoRALinear) and isinstance(model["attn"].q, nn.Linear)
    everything = add_lora(_model(), None, rank=2)
    lora = [n for n, m in everything.named_modules() if isinstance(m, LoRALinear)]
    assert lora == ["attn.q", "attn.k", "attn.v", "head"]
    trainable = [n for n, p in everything.named_parameters() if p.requires_grad]
    again = add_lora(everything, None, rank=2)  # applying it again does not nest LoRA layers
    assert [n for n, m in again.named_modules() if isinstance(m, LoRALinear)] == lora
    assert [n for n, p in again.named_parameters() if p.requires_grad] == trainable


def test_add_lora_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"'attn\.norm' is a LayerNorm, not an nn\.Linear"):
        add_lora(_model(), ["attn.norm"])
    with pytest.raises(ValueError, match=r"no nn\.Linear named \['query'\].*'attn\.q'"):
        add_lora(_model(), ["query"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": 2, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1\.0"),
    ],
)
def test_layer_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(3, 3), **kwargs)
    with pytest.raises(TypeError, match=r"wraps an nn\.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(3, 3, 1))
