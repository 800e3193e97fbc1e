"""flatopt on torchtune's ``LoRALinear`` and ``DoRALinear``, alone and in a tiny LoRA Llama-2.

W' = W + (alpha / rank)·B@A is computed here densely from the layer's own factors, never from
flatopt's adapter. With ``LoRALinear(quantize_base=True)`` the base weight is an NF4 tensor, which
flatopt cannot add ε to: it adds x·εᵀ to the layer's output instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_checks import (
    DTYPES,
    FAN_IN,
    OUT,
    RANK,
    TOLERANCE,
    assert_law,
    check_reference,
    check_round_trip,
    law_std,
    merged_case,
    read_output_noise,
    wrap,
)
from torch import Tensor, nn
from torchao.dtypes.nf4tensor import to_nf4
from torchtune.models.llama2 import lora_llama2
from torchtune.modules.peft import (
    DoRALinear,
    LoRALinear,
    get_adapter_params,
    set_trainable_params,
)

from flatopt.noise import derive_seed, draw_noise

ALPHA = 8.0  # scaling alpha / r = 2


def build(kind: str, dtype: torch.dtype, seed: int = 0):
    """(model, layer, x): one torchtune layer with OUT x FAN_IN W and a large ΔW."""
    W, B, A = merged_case(seed=seed)
    cls = DoRALinear if kind == "dora" else LoRALinear
    layer = cls(FAN_IN, OUT, rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.lora_a.weight.copy_(A)
        layer.lora_b.weight.copy_(B / (ALPHA / RANK))
    if kind == "dora":
        layer.initialize_dora_magnitude()
        with torch.no_grad():  # a trained magnitude: not just the norms of W'
            layer.magnitude.mul_(torch.linspace(0.5, 2, OUT, dtype=torch.float64))
    set_trainable_params(layer, get_adapter_params(layer))
    model = nn.Sequential(layer, nn.Tanh()).to(dtype)
    x = torch.randn(4, FAN_IN, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return model, layer, x


def merged(layer: nn.Module) -> Tensor:
    """W + (alpha / rank)·B@A, dense, in fp64: what the layer's forward applies."""
    W = layer.weight.detach().double()
    if layer.disabled:
        return W
    BA = layer.lora_b.weight.detach().double() @ layer.lora_a.weight.detach().double()
    return W + ALPHA / RANK * BA


def _weight_noise(opt, layer: nn.Module) -> Tensor:
    """ε read off the weight the layer's forward sees (``layer.weight`` inside its forward).

    A forward hook put first runs before flatopt's, which puts W back.
    """
    seen = []
    handle = layer.register_forward_hook(
        lambda m, a, o: seen.append(m.weight.detach().clone()), prepend=True
    )
    x = torch.zeros(1, FAN_IN, dtype=layer.weight.dtype)
    try:
        with torch.no_grad(), opt.perturbed():
            layer(x)
    finally:
        handle.remove()
    return seen[0].double() - layer.weight.detach().double()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_lora_linear_noise_follows_the_law(dtype):
    model, layer, _ = build("lora", dtype)
    opt = wrap(model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    eye = torch.eye(FAN_IN, dtype=dtype)
    # On identity inputs the output is W'ᵀ: noisy minus clean is εᵀ (plus bf16 rounding).
    eps = read_output_noise(opt, layer, lambda: layer(eye)).t()
    assert_law(eps, law_std(merged(layer), 0.1), dtype, wrong=law_std(layer.weight, 0.1))
    assert_law(_weight_noise(opt, layer), law_std(merged(layer), 0.1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_dora_linear_noise_follows_the_law_and_keeps_the_magnitude(dtype):
    model, layer, _ = build("dora", dtype)
    opt = wrap(model, sigma=0.1)
    # DoRA's output is not W'x, so ε is read off the weight its forward sees.
    eps = _weight_noise(opt, layer)
    assert_law(eps, law_std(merged(layer), 0.1), dtype, wrong=law_std(layer.weight, 0.1))
    # torchtune's DoRA takes its norm of self.weight inside the same forward, i.e. of W' + ε:
    # the noise turns the direction, and each row of the effective weight keeps norm m_i.
    eye = torch.eye(FAN_IN, dtype=dtype)
    with torch.no_grad(), opt.perturbed():
        effective = layer(eye).t().double()
    norms = torch.linalg.vector_norm(effective, dim=1)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(norms, layer.magnitude.detach().double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_round_trip_is_bitwise_exact(kind, dtype):
    model, _, x = build(kind, dtype)
    check_round_trip(model, lambda: model(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_gradients_match_the_explicit_reference(kind, dtype):
    model, layer, x = build(kind, dtype)
    check_reference(model, lambda call: call(x), lambda: {layer: merged(layer)}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_disabled_adapter_adds_nothing(dtype):
    model, layer, _ = build("lora", dtype)
    layer.disabled = True
    opt = wrap(model, sigma=0.1)
    eps = _weight_noise(opt, layer)
    W = layer.weight.detach().double()
    layer.disabled = False
    assert_law(eps, law_std(W, 0.1), dtype, wrong=law_std(merged(layer), 0.1))


def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = lora_llama2(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        vocab_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=16,
        lora_rank=2,
        lora_alpha=4,
    )
    set_trainable_params(model, get_adapter_params(model))
    for module in model.modules():
        if isinstance(module, LoRALinear):  # B starts at 0: give W' its low-rank part
            nn.init.normal_(module.lora_b.weight, std=0.2)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_tiny_lora_llama(dtype):
    model = _tiny_llama(dtype)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = wrap(model)
    assert len(opt.targets) == len(layers) == 4 + 3 + 1
    check_round_trip(model, lambda: model(tokens))

    def merged_all():
        return {layer: merged(layer) * 1 for layer in layers}

    check_reference(model, lambda call: call(tokens), merged_all, dtype)


def _nf4(dtype: torch.dtype, seed: int = 0, cls: type = LoRALinear):
    """``LoRALinear(quantize_base=True)``: the base weight W an NF4Tensor, ΔW large."""
    _, B, A = merged_case(seed=seed)
    layer = cls(FAN_IN, OUT, rank=RANK, alpha=ALPHA, quantize_base=True)
    with torch.no_grad():
        layer.lora_a.weight.copy_(A)
        layer.lora_b.weight.copy_(B / (ALPHA / RANK))
    if cls is DoRALinear:
        layer.initialize_dora_magnitude()
    set_trainable_params(layer, get_adapter_params(layer))
    layer.to(dtype)
    if layer.weight.dtype != dtype:  # .to() keeps NF4 as it is: quantize W in dtype instead
        layer.weight = nn.Parameter(to_nf4(layer.weight.get_original_weight().to(dtype)), False)
    assert type(layer.weight).__name__ == "NF4Tensor" and layer.weight.dtype == dtype
    x = torch.randn(4, FAN_IN, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return nn.Sequential(layer, nn.Tanh()), layer, x


def _nf4_merged(layer: nn.Module) -> Tensor:
    W = layer.weight.get_original_weight().double()  # W as NF4 stores it
    BA = layer.lora_b.weight.detach().double() @ layer.lora_a.weight.detach().double()
    return W + ALPHA / RANK * BA


_NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def _nf4_state(weight: Tensor):
    return weight, {
        k: (getattr(weight, k).clone(), getattr(weight, k)._version) for k in _NF4_PARTS
    }


def _assert_nf4_untouched(weight: Tensor, state) -> None:
    same, parts = state
    assert weight is same
    for name, (value, version) in parts.items():
        assert torch.equal(getattr(weight, name), value), name
        assert getattr(weight, name)._version == version, name


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear], ids=["lora", "dora"])
def test_nf4_base_noise_follows_the_law(cls, dtype):
    """An NF4 W cannot be added to: flatopt adds x·εᵀ to the layer's output instead. For
    DoRA that is after DoRA's rescaling: its effective weight is W_DoRA + ε, ε still scaled
    by the rows of W' = W + ΔW (unlike the plain DoRA, whose norm is taken of W' + ε)."""
    model, layer, _ = _nf4(dtype, cls=cls)
    opt = wrap(model, sigma=0.1)
    assert opt.targets == [("0", (OUT, FAN_IN))]
    eye = torch.eye(FAN_IN, dtype=dtype)
    eps = read_output_noise(opt, layer, lambda: layer(eye)).t()
    W = layer.weight.get_original_weight().double()
    assert_law(eps, law_std(_nf4_merged(layer), 0.1), dtype, wrong=law_std(W, 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_nf4_base_round_trip_leaves_the_quantized_weight_untouched(dtype):
    model, layer, x = _nf4(dtype)
    state = _nf4_state(layer.weight)
    opt = wrap(model, sigma=0.2)
    for _ in range(3):
        with torch.no_grad():
            clean = model(x)
        with opt.perturbed():
            out = model(x)
            _assert_nf4_untouched(layer.weight, state)
            out.float().square().mean().backward()
        _assert_nf4_untouched(layer.weight, state)
        assert not torch.equal(out.detach(), clean)
        opt.step()
        opt.zero_grad()
    _assert_nf4_untouched(layer.weight, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_nf4_base_lora_gradients_match_the_explicit_reference(dtype):
    """The reference adds F.linear(x, ε) to the layer's output by hand, ε from the dense W'."""
    model, layer, x = _nf4(dtype)
    opt = wrap(model, sigma=0.2, seed=5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with opt.perturbed():
        fast = model(x)
        fast.float().square().mean().backward()
    fast_grads = [p.grad.clone() for p in trainable]
    opt.zero_grad()

    std = law_std(_nf4_merged(layer), opt.sigma).float()
    seed = derive_seed(opt.seed, opt.num_steps, 0, 0, 0)
    eps = draw_noise(layer.weight, std, generator=torch.Generator(), seed=seed, dtype=dtype)
    handle = layer.register_forward_hook(lambda m, a, out: out + F.linear(a[0], eps.to(dtype)))
    try:
        slow = model(x)
    finally:
        handle.remove()
    slow.float().square().mean().backward()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(fast, slow, **tol)
    for param, want in zip(trainable, fast_grads):
        torch.testing.assert_close(want.float(), param.grad.float(), **tol)


def test_state_dict_keys_are_unchanged_by_wrapping():
    model = _tiny_llama(torch.float32)
    keys = list(model.state_dict())
    opt = wrap(model)
    with opt.perturbed():
        model(torch.zeros(1, 4, dtype=torch.long))
        assert list(model.state_dict()) == keys
    assert list(model.state_dict()) == keys
